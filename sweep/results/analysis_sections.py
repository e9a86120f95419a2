"""The report's sections for the mask, neuron and subspace analyses: tables written beside the report,
figures drawn, and the text that says what each analysis computed and whose definition it follows."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import polars as pl

from sweep.results.figures import heatmap_png
from sweep.results.reduce import StudyTables, calibration_matrix
from sweep.results.table_files import slug, table_html, write_table
from sweep.store.records import PlanRecord


def analysis_sections(study_dir, plan: PlanRecord, finished: set[str], tables: StudyTables, out_dir: Path) -> list[str]:
    """The mask, neuron and subspace analyses the study switched on, as report sections (tables written
    beside the report as analysis-*.parquet, and .csv while short; figures as PNG)."""
    from sweep.results.analyses import AnalysisSettings, run_analyses
    from sweep.results.figures import iou_png, lape_png, snr_png

    config = plan.analyses
    on = {name: plan.analysis_enabled(name) for name in ("masks", "lape", "subspace")}
    if not any(on.values()):
        return []
    lape_config, subspace_config = config.get("lape") or {}, config.get("subspace") or {}
    settings = AnalysisSettings(lape_quantile=lape_config.get("lape_quantile", 0.01),
                                activation_quantile=lape_config.get("activation_quantile", 0.95),
                                threshold_from=lape_config.get("threshold_from", "own"),
                                subspace_rank=subspace_config.get("rank"))
    result = run_analyses(study_dir, plan, finished, settings, on["masks"], on["lape"], on["subspace"])
    written = {name: write_table(getattr(result, name), out_dir / "tables", f"analysis-{name}")
               for name in ("mask_overlap", "neurons", "lape_hist", "snr", "layer_error")
               if getattr(result, name).height}
    sections: list[str] = []

    def figure(png: bytes, slug: str, title: str) -> str:
        (out_dir / "figures" / f"{slug}.png").write_bytes(png)
        data = base64.b64encode(png).decode("ascii")
        return (f"<figure><img alt=\"{html.escape(title)}\" src=\"data:image/png;base64,{data}\">"
                f"<figcaption>{html.escape(title)}</figcaption></figure>")

    if on["masks"]:
        sections += ["<h2>Pruning masks: overlap between calibration languages</h2>",
                     "<p>IoU of the pruned positions of two masks (1: identical, 0: disjoint), over each layer's "
                     f"matrices; per matrix in <code>tables/{written.get('mask_overlap', 'analysis-mask_overlap.parquet')}</code>.</p>"]
        overlap = result.mask_overlap.filter(pl.col("matrix") == "all") if result.mask_overlap.height else result.mask_overlap
        for model, pruner, sparsity in tables.groups:
            group = overlap.filter((pl.col("model") == model) & (pl.col("pruner") == pruner)
                                   & (pl.col("sparsity") == sparsity)) if overlap.height else overlap
            if group.height:
                title = f"{model} / {pruner} {sparsity}: mask overlap"
                sections.append(figure(iou_png(group, tables.languages, title),
                                       slug(model, pruner, sparsity, "mask-iou"), title))
        if result.layer_error.height:
            sections += ["<h3>Layer-wise pruning error on held-out text</h3>",
                         "<p>||WX - W'X||^2 / ||WX||^2 of each linear layer on the first held-out tokens of each "
                         "target language, averaged over layers and matrices (lower keeps more); per layer and "
                         f"matrix in <code>tables/{written['layer_error']}</code>.</p>"]
            mean_error = (result.layer_error.group_by("model", "pruner", "sparsity", "calibration", "target")
                          .agg(pl.col("relative_error").mean().alias("mean"))
                          .with_columns(pl.lit("layer error").alias("task"), pl.lit("relative_error").alias("metric")))
            for model, pruner, sparsity in tables.groups:
                matrix = calibration_matrix(mean_error.lazy(), model, pruner, sparsity, "layer error",
                                            "relative_error", tables.languages)
                if matrix.height:
                    title = f"{model} / {pruner} {sparsity}: mean layer-wise pruning error"
                    sections.append(figure(heatmap_png(matrix, title, True),
                                           slug(model, pruner, sparsity, "layer-error"), title))
        if result.without_masks:
            sections.append(f"<p class=note>No masks for {len(result.without_masks)} trial(s) (run with "
                            f"analyses.masks off): {html.escape(', '.join(result.without_masks[:10]))}</p>")
    if on["lape"] and result.neurons.height:
        sections += ["<h2>Language-specific neurons (LAPE)</h2>",
                     "<p>Tang et al.'s procedure (their identify.py): the threshold is the k-th smallest of all "
                     f"activation probabilities, k = round(count x {settings.activation_quantile:g}); a neuron whose "
                     "probability exceeds it in no language gets LAPE +inf; the "
                     f"round(all neurons x {settings.lape_quantile:g}) neurons of lowest LAPE over all layers are "
                     "selected, and each belongs to the languages in which its probability exceeds the threshold. "
                     "Against the dense model's language-specific neurons: how many survive pruning, vanish and "
                     "appear. <code>threshold_from</code>: <code>own</code> applies each model's own threshold, "
                     "<code>dense</code> the dense model's; a trial has a row for each where they differ "
                     f"(<code>{html.escape(settings.threshold_from)}</code>, the study's setting, first) and one row "
                     "<code>both</code> where they agree.</p>",
                     table_html(result.neurons.select("name", "threshold_from", "threshold", "dense", "pruned",
                                                      "survive", "vanish", "appear", "mean_lape", "active_neurons"),
                                limit=300)]
        for model, pruner, sparsity in tables.groups:
            hist = result.lape_hist.filter((pl.col("model") == model) & ((pl.col("pruner") == "dense") | (
                (pl.col("pruner") == pruner) & (pl.col("sparsity") == sparsity))))
            if hist.filter(pl.col("pruner") != "dense").height:
                title = f"{model} / {pruner} {sparsity}: LAPE, dense vs pruned"
                sections.append(figure(lape_png(hist, title), slug(model, pruner, sparsity, "lape"), title))
    if on["subspace"] and result.snr.height:
        ranks = sorted(set(result.snr["rank"].to_list()))
        rank_text = (f"r = {ranks[0]}" if len(ranks) == 1 else f"r = {ranks[0]} to {ranks[-1]} (by layer)")
        rank_text += " (languages - 1)" if settings.subspace_rank is None else f" (subspace.rank {settings.subspace_rank})"
        sampled = result.snr.filter(pl.col("variant") == "token")["tokens"].drop_nulls() \
            if "tokens" in result.snr.columns else pl.Series([], dtype=pl.Int64)
        token_text = ""
        if sampled.len():
            low, high = int(sampled.min()), int(sampled.max())
            token_text = f" ({low if low == high else f'{low}-{high}'} sampled tokens per language"
            token_text += ": so few make this variant noisy)" if high < 32 else ")"
        sections += ["<h2>Latent subspaces: language-specific vs language-agnostic</h2>",
                     "<p>Each layer's language-specific subspace is found by LSAR (Xie et al., 2022; both steps) "
                     f"on the dense model's per-language mean hidden states, {html.escape(rank_text)}; its "
                     "orthogonal complement is language-agnostic. SNR (dB) of each pruned model's hidden states "
                     "against the dense one's in each subspace, higher keeps more, in two variants: "
                     "<em>centroid</em>, 10 log10(||P mu_d||^2 / ||P (mu_p - mu_d)||^2) on the per-language means, "
                     "and <em>token</em>, 10 log10(sum_t ||P h_d(t)||^2 / sum_t ||P (h_p(t) - h_d(t))||^2) on the same "
                     f"sampled evaluation tokens in both models{html.escape(token_text)}. Both SNRs are this project's own definition: the "
                     "reference study (Kurz et al., 2024) does not publish its formula. Mean over calibration x "
                     "target pairs per layer (solid: centroid, dashed: token); per pair in "
                     f"<code>tables/{written['snr']}</code>. Identical representations are +inf and left out of "
                     "means.</p>"]
        for model, pruner, sparsity in tables.groups:
            group = result.snr.filter((pl.col("model") == model) & (pl.col("pruner") == pruner)
                                      & (pl.col("sparsity") == sparsity))
            if group.height:
                title = f"{model} / {pruner} {sparsity}: SNR per layer"
                sections.append(figure(snr_png(group, title), slug(model, pruner, sparsity, "snr"), title))
        no_tokens = sorted(set(result.snr.filter(pl.col("variant") == "centroid")["name"].to_list())
                           - set(result.snr.filter(pl.col("variant") == "token")["name"].to_list()))
        if no_tokens:
            sections.append(f"<p class=note>No per-token SNR for {len(no_tokens)} trial(s) (it or its dense "
                            "trial has no token sample: statistics written before it existed, or "
                            "subspace.token_sample 0; or the two samples are not the same tokens): "
                            f"{html.escape(', '.join(no_tokens[:10]))}</p>")
    if (on["lape"] or on["subspace"]) and result.without_statistics:
        sections.append(f"<p class=note>No neuron or hidden-state statistics for {len(result.without_statistics)} "
                        f"trial(s) (run with analyses.lape and analyses.subspace off): "
                        f"{html.escape(', '.join(result.without_statistics[:10]))}</p>")
    return sections


