"""`sweep demo` (and `make demo`): build the offline demo assets, then run what exists of the demo study.

Today that is: validate and plan the study, evaluate each dense model in every target language, and
write reports/demo/. The scheduler (issue 5) and the report (issue 6) take over from here.
"""
from __future__ import annotations

import html
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from sweep.env import REPO_ROOT, apply_default_env
from sweep.grid import Plan, expand
from sweep.problems import StudyInvalid
from sweep.study import Study, load_study

DEMO_STUDY = REPO_ROOT / "sweep" / "studies" / "demo.yaml"


def run_demo(force_assets: bool = False, report_dir: Path = Path("reports/demo"), study_path: Path = DEMO_STUDY) -> int:
    from engine.demo.build import ensure_demo_assets

    started = time.perf_counter()
    apply_default_env()
    assets = ensure_demo_assets(force=force_assets)
    try:
        study = load_study(study_path)
    except StudyInvalid as err:
        print(err, file=sys.stderr)
        return 2
    plan = expand(study)
    from sweep.cli import format_plan

    print(format_plan(plan, show_trials=False))
    dense = evaluate_dense_baselines(study)
    report_dir = report_dir if report_dir.is_absolute() else Path.cwd() / report_dir
    write_demo_report(report_dir, study, plan, assets.metadata, dense, time.perf_counter() - started)
    print(f"report: {report_dir / 'index.html'}")
    return 0


def evaluate_dense_baselines(study: Study) -> list[dict]:
    """Dense perplexity of every model of the study in every target language."""
    import torch

    from engine.data.local_files import find_language_files, read_texts
    from engine.evaluate.suite import perplexity_by_language
    from engine.models import ModelSource, load_model

    spec = study.spec
    ppl = spec.evaluation.perplexity
    if ppl is None or ppl.source.kind != "local":
        raise SystemExit("the demo evaluates local perplexity text; this study has none")
    root = study.resolve(ppl.source.path)
    texts = {lang: read_texts(find_language_files(root, lang, ppl.source.split), ppl.source.text_field)
             for lang in spec.evaluation.languages}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for index, model_spec in enumerate(spec.models):
        source = ModelSource(str(study.model_paths[index]), model_spec.revision, model_spec.dtype,
                             model_spec.trust_remote_code)
        started = time.perf_counter()
        model, tokenizer = load_model(source)
        results = perplexity_by_language(model, tokenizer, texts, ppl.window, ppl.max_tokens, spec.evaluation.batch_size)
        seconds = time.perf_counter() - started
        for lang, result in results.items():
            rows.append({"model": model_spec.label, "language": lang, **result.as_dict()})
        print(f"  {model_spec.label}: dense perplexity in {len(results)} languages ({seconds:.1f} s)")
    return rows


def write_demo_report(out: Path, study: Study, plan: Plan, asset_metadata: dict, dense: list[dict], seconds: float) -> None:
    import polars as pl

    out.mkdir(parents=True, exist_ok=True)
    frame = pl.DataFrame(dense)
    frame.write_csv(out / "dense_perplexity.csv")
    plan_rows = [{"key": t.key, "name": t.name, "dense": t.is_dense} for t in plan.trials]
    (out / "plan.json").write_text(json.dumps(plan_rows, indent=1) + "\n")
    (out / "assets.json").write_text(json.dumps(asset_metadata, indent=1, sort_keys=True, default=str) + "\n")
    (out / "index.html").write_text(_html(study, plan, asset_metadata, frame, seconds), encoding="utf-8")


def _table(headers: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _html(study: Study, plan: Plan, meta: dict, dense, seconds: float) -> str:
    import polars as pl

    languages = study.spec.evaluation.languages
    bpb = dense.pivot(on="language", index="model", values="bits_per_byte").select(["model", *languages])
    sections = [
        f"<h1>Demo study: {html.escape(study.name)}</h1>",
        f"<p>{html.escape(study.spec.description)}</p>",
        "<h2>Grid</h2>",
        f"<p>{len(plan.trials)} trials: {len(plan.pruned)} pruned + {len(plan.dense)} dense baselines. "
        "Pruning trials run once the scheduler lands; dense baselines are evaluated below.</p>",
        _table(["model", "pruned", "dense"], [[m, c["pruned"], c["dense"]] for m, c in plan.per_model().items()]),
        "<h2>Dense baselines: bits per byte on held-out text</h2>",
        f"<p>Non-overlapping windows of {study.spec.evaluation.perplexity.window} tokens. "
        "Bits per byte compare across languages; token perplexity does not.</p>",
        _table(list(bpb.columns), [list(r) for r in bpb.iter_rows()]),
        "<h2>Dense baselines: token perplexity</h2>",
        _table(["model", "language", "tokens", "bytes", "token perplexity", "bits per byte"],
               [[r["model"], r["language"], r["tokens"], r["bytes"], r["token_perplexity"], r["bits_per_byte"]]
                for r in dense.iter_rows(named=True)]),
    ]
    models = meta.get("models") or {}
    if models:
        rows = [[name, lang, n["loss"], n["unigram_loss"], n["margin"]]
                for name, info in models.items() for lang, n in info.get("heldout", {}).items()]
        sections += ["<h2>Demo models</h2>",
                     _table(["model", "architecture", "parameters", "training tokens", "training seconds"],
                            [[name, info["model_type"], f"{info['parameters']:,}", f"{info['training']['tokens']:,}",
                              info["training"]["seconds"]] for name, info in models.items()]),
                     "<h3>Held-out loss against a unigram baseline (nats per token)</h3>",
                     _table(["model", "language", "model loss", "unigram loss", "margin"], rows)]
    sources = meta.get("sources") or []
    if sources:
        sections += ["<h2>Corpus sources</h2>",
                     _table(["source", "version", "licence", "languages"],
                            [[s.get("name"), s.get("version"), s.get("license") or s.get("licence"),
                              ", ".join(s.get("languages", []))] for s in sources])]
    sections += [
        "<h2>Run</h2>",
        _table(["field", "value"], [
            ["written", datetime.now(timezone.utc).isoformat(timespec="seconds")],
            ["seconds", seconds],
            ["python", platform.python_version()],
            ["polars", pl.__version__],
            ["assets recipe", meta.get("recipe_hash", "")],
        ]),
    ]
    style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
             "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}"
             "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}")
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>demo study</title>"
            f"<style>{style}</style></head><body>" + "\n".join(sections) + "</body></html>\n")
