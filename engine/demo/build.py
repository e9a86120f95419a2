"""Builds (or finds cached) the offline demo assets: corpus, tokenizer and two small trained models.

    python -m engine.demo.build [--root DIR] [--force] [--tiny]

Layout under the root (default: $SWEEP_DEMO_DIR, else <repo>/.cache/demo):

    corpus/<lang>/{calibration,evaluation,tasks}.jsonl
    tokenizer/                 tokenizer.json, tokenizer_config.json
    models/<name>/             config.json, model.safetensors, tokenizer files
    metadata.json              written last; its recipe_hash decides cache hits

Heavy imports (torch, transformers) happen only when a build is needed, so a cache hit is cheap.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engine.demo.corpus import (
    DEMO_LANGUAGES,
    SPLITS,
    CorpusConfig,
    build_corpus,
    read_splits,
    source_identity,
    split_path,
)
from engine.demo.recipe import ModelRecipe, TrainRecipe
from engine.demo.tasks import ensure_demo_tasks
from engine.io import project_cache_dir

# Bump when the build code changes what it produces for the same recipe.
BUILD_VERSION = 1
METADATA = "metadata.json"
ENV_ROOT = "SWEEP_DEMO_DIR"
ENV_CORPUS_ROOT = "SWEEP_CORPUS_DIR"

Log = Callable[[str], None]


DEFAULT_MODELS: tuple[ModelRecipe, ...] = (
    ModelRecipe(name="demo-llama", architecture="llama"),
    ModelRecipe(name="demo-cohere", architecture="cohere"),
)


@dataclass(frozen=True)
class DemoRecipe:
    seed: int = 0
    languages: tuple[str, ...] = DEMO_LANGUAGES
    split_fractions: tuple[tuple[str, float], ...] = (("calibration", 0.8), ("evaluation", 0.1), ("tasks", 0.1))
    handbook_cap_chars: int = 250_000
    dataset_build_cap_chars: int | None = None
    use_handbook: bool = True
    vocab_size: int = 8192
    tokenizer_min_frequency: int = 2
    models: tuple[ModelRecipe, ...] = DEFAULT_MODELS
    train: TrainRecipe = TrainRecipe()
    eval_seq_len: int = 256

    @classmethod
    def tiny(cls, seed: int = 0) -> DemoRecipe:
        """A seconds-scale variant for tests: small text caps, vocabulary and models, same code path."""
        small = dict(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=192,
                     max_position_embeddings=128)
        return cls(
            seed=seed,
            handbook_cap_chars=15_000,
            dataset_build_cap_chars=15_000,
            vocab_size=512,
            models=(
                ModelRecipe(name="demo-llama", architecture="llama", **small),
                ModelRecipe(name="demo-cohere", architecture="cohere", **small),
            ),
            train=TrainRecipe(seq_len=64, batch_size=8, steps=200, lr=1e-2, warmup_steps=20, precision="fp32"),
            eval_seq_len=64,
        )

    @classmethod
    def corpus_only(cls, seed: int = 0) -> DemoRecipe:
        """The corpus (and its tokenizer) without the demo models: what studies of real pretrained models
        calibrate and evaluate on. The corpus is the very one the full recipe builds."""
        return cls(seed=seed, models=())

    def corpus_config(self) -> CorpusConfig:
        return CorpusConfig(
            languages=tuple(self.languages),
            seed=self.seed,
            split_fractions=tuple(tuple(pair) for pair in self.split_fractions),
            handbook_cap_chars=self.handbook_cap_chars,
            dataset_build_cap_chars=self.dataset_build_cap_chars,
            use_handbook=self.use_handbook,
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def recipe_hash(self) -> str:
        """Hash of the canonical recipe JSON, the build version and the identity of the source files."""
        payload = {
            "build_version": BUILD_VERSION,
            "recipe": self.to_json(),
            "sources": source_identity(self.corpus_config()),
        }
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class DemoAssets:
    root: Path
    corpus_dir: Path
    tokenizer_dir: Path
    model_dirs: dict[str, Path]
    metadata: dict = field(compare=False, repr=False)

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self.metadata["recipe"]["languages"])

    def split_path(self, lang: str, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return split_path(self.corpus_dir, lang, split)

    @classmethod
    def at(cls, root: Path, metadata: dict) -> DemoAssets:
        return cls(
            root=root,
            corpus_dir=root / "corpus",
            tokenizer_dir=root / "tokenizer",
            model_dirs={name: root / "models" / name for name in metadata["models"]},
            metadata=metadata,
        )


def default_root() -> Path:
    env = os.environ.get(ENV_ROOT)
    return Path(env).expanduser() if env else project_cache_dir() / "demo"


def default_corpus_root() -> Path:
    env = os.environ.get(ENV_CORPUS_ROOT)
    return Path(env).expanduser() if env else project_cache_dir() / "corpus"


def ensure_corpus(root: Path | None = None, force: bool = False, log: Log = print) -> DemoAssets:
    """The offline corpus alone (DemoRecipe.corpus_only) with its lm-eval tasks, at `root` (default
    $SWEEP_CORPUS_DIR, else <repo>/.cache/corpus): seconds to build, no model training."""

    assets = ensure_demo_assets(root if root is not None else default_corpus_root(), DemoRecipe.corpus_only(),
                                force=force, log=log)
    ensure_demo_tasks(assets)
    return assets


def read_metadata(root: Path) -> dict | None:
    try:
        return json.loads((root / METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cached_assets(root: Path, recipe: DemoRecipe) -> DemoAssets | None:
    """The assets at root if they were built from this recipe and every file they list is present."""
    metadata = read_metadata(root)
    if not metadata or metadata.get("recipe_hash") != recipe.recipe_hash():
        return None
    if not all((root / rel).is_file() for rel in metadata.get("files", [])):
        return None
    return DemoAssets.at(root, metadata)


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """One builder per root at a time (several sweep workers may ask for the assets at once)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_demo_assets(
    root: Path | None = None,
    recipe: DemoRecipe | None = None,
    force: bool = False,
    log: Log = print,
) -> DemoAssets:
    """The demo assets for `recipe` at `root`, built only when missing, stale or `force`d."""
    root = Path(root).expanduser().resolve() if root is not None else default_root().resolve()
    recipe = recipe or DemoRecipe()
    if not force and (hit := cached_assets(root, recipe)) is not None:
        return hit
    with _build_lock(root):
        if not force and (hit := cached_assets(root, recipe)) is not None:
            return hit  # another process built it while we waited
        _remove_leftovers(root)
        staging = root.parent / f".{root.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            build_assets(staging, recipe, log)
            _swap_into_place(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    metadata = read_metadata(root)
    assert metadata is not None
    return DemoAssets.at(root, metadata)


def _remove_leftovers(root: Path) -> None:
    # Staging trees of builds that crashed; safe to delete because we hold the lock.
    for pattern in (f".{root.name}.building-*", f".{root.name}.old-*"):
        for stale in root.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def _swap_into_place(staging: Path, root: Path) -> None:
    # A directory cannot be renamed over a non-empty one: move the old tree aside first. In between,
    # root is absent, which reads as "not built" rather than as a half-built tree.
    old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
    if root.exists():
        os.rename(root, old)
    os.rename(staging, root)
    shutil.rmtree(old, ignore_errors=True)


def build_assets(out: Path, recipe: DemoRecipe, log: Log = print) -> dict:
    """Builds every asset into `out` (metadata.json last) and returns the metadata."""
    import torch

    from engine.demo import heldout
    from engine.demo import tokenizer as tok_mod
    from engine.demo import train as train_mod

    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    timings: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        log(f"demo assets: building into {out} (recipe {recipe.recipe_hash()})")
        corpus = build_corpus(recipe.corpus_config(), out / "corpus")
        timings["corpus"] = time.perf_counter() - t0
        log(f"  corpus: {len(corpus.paths)} files in {timings['corpus']:.1f}s; "
            f"sources {', '.join(s['name'] for s in corpus.sources)}")

        t0 = time.perf_counter()
        calibration_text = read_splits(out / "corpus", recipe.languages, "calibration")
        tok_config = tok_mod.TokenizerConfig(
            vocab_size=recipe.vocab_size,
            min_frequency=recipe.tokenizer_min_frequency,
            model_max_length=max((m.max_position_embeddings for m in recipe.models), default=recipe.eval_seq_len),
        )
        tokenizer = tok_mod.train_tokenizer(calibration_text, tok_config)
        tok_mod.save_tokenizer(tokenizer, out / "tokenizer")
        streams = {
            split: train_mod.token_streams(tokenizer, read_splits(out / "corpus", recipe.languages, split))
            for split in SPLITS
        }
        counts = corpus.counts
        for lang in recipe.languages:
            for split in SPLITS:
                n_docs = counts[lang][split]["paragraphs"]
                counts[lang][split]["tokens"] = len(streams[split][lang]) - n_docs  # minus EOS separators
        timings["tokenizer"] = time.perf_counter() - t0
        log(f"  tokenizer: vocab {len(tokenizer)} in {timings['tokenizer']:.1f}s")

        vocab = len(tokenizer)
        unigram = {
            lang: heldout.unigram_loss(streams["calibration"][lang], streams["evaluation"][lang], vocab, recipe.eval_seq_len)
            for lang in recipe.languages
        }
        models_meta: dict[str, dict] = {}
        for index, spec in enumerate(recipe.models):
            models_meta[spec.name] = _train_one(
                spec, index, recipe, tokenizer, streams, unigram, out / "models" / spec.name, log
            )
            timings[f"train:{spec.name}"] = models_meta[spec.name]["training"]["seconds"]
            timings[f"eval:{spec.name}"] = models_meta[spec.name]["eval_seconds"]

        metadata = {
            "build_version": BUILD_VERSION,
            "recipe": recipe.to_json(),
            "recipe_hash": recipe.recipe_hash(),
            "source_identity": source_identity(recipe.corpus_config()),
            "sources": corpus.sources,
            "languages": list(recipe.languages),
            "splits": list(SPLITS),
            "corpus": counts,
            "tokenizer": {**tok_mod.tokenizer_info(tokenizer), "dir": "tokenizer"},
            "models": models_meta,
            "unigram_loss": unigram,
            "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
            "build_seconds": round(time.perf_counter() - started, 3),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch_version": torch.__version__,
        }
        metadata["files"] = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        (out / METADATA).write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        log(f"demo assets: built in {metadata['build_seconds']:.1f}s")
        return metadata
    finally:
        torch.set_num_threads(previous_threads)


def _train_one(spec: ModelRecipe, index: int, recipe: DemoRecipe, tokenizer, streams, unigram, directory: Path,
               log: Log) -> dict:
    from engine.demo import heldout
    from engine.demo import train as train_mod

    config = train_mod.model_config(spec, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    seed = recipe.seed * 1000 + index
    model = train_mod.build_model(config, seed)
    r = recipe.train
    precision = train_mod.resolve_precision(r.precision)
    log(f"  {spec.name} ({spec.architecture}, {train_mod.count_parameters(model):,} parameters, {precision}): "
        f"{r.steps} steps x {r.batch_size} x {r.seq_len} tokens")
    result = train_mod.train(model, streams["calibration"], r, seed, bf16=precision == "bf16", log=log)
    train_mod.save_model(model, tokenizer, directory)

    t0 = time.perf_counter()
    losses = {
        lang: heldout.model_loss(model, streams["evaluation"][lang], recipe.eval_seq_len) for lang in recipe.languages
    }
    eval_seconds = time.perf_counter() - t0
    return {
        "architecture": spec.architecture,
        "model_type": config.model_type,
        "dir": f"models/{spec.name}",
        "parameters": result.parameters,
        "spec": dataclasses.asdict(spec),
        "training": {
            "steps": result.steps,
            "tokens": result.tokens,
            "seconds": round(result.seconds, 3),
            "tokens_per_second": round(result.tokens / result.seconds, 1),
            "final_train_loss": round(result.final_loss, 4),
            "precision": precision,
            "seed": seed,
        },
        "heldout": {
            lang: {
                "loss": round(losses[lang], 4),
                "unigram_loss": round(unigram[lang], 4),
                "margin": round(unigram[lang] - losses[lang], 4),
            }
            for lang in recipe.languages
        },
        "eval_seconds": round(eval_seconds, 3),
    }


def summary_table(assets: DemoAssets) -> str:
    meta = assets.metadata
    models = meta["models"]
    lines = [f"demo assets at {assets.root} (recipe {meta['recipe_hash']}, built in {meta['build_seconds']:.0f}s)"]
    lines.append("sources: " + "; ".join(f"{s['name']} {s['version']} ({s['licence']}): {','.join(s['languages'])}"
                                         for s in meta["sources"]))
    lines.append(f"{'model':<14}{'type':<8}{'params':>12}{'tokens':>10}{'train s':>9}")
    for name, m in models.items():
        lines.append(f"{name:<14}{m['model_type']:<8}{m['parameters']:>12,}{m['training']['tokens']:>10,}"
                     f"{m['training']['seconds']:>9.0f}")
    lines.append("held-out loss, nats/token (evaluation split):")
    lines.append(f"{'lang':<6}{'unigram':>9}" + "".join(f"{name:>14}" for name in models))
    for lang in meta["languages"]:
        row = f"{lang:<6}{meta['unigram_loss'][lang]:>9.3f}"
        row += "".join(f"{m['heldout'][lang]['loss']:>14.3f}" for m in models.values())
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.demo.build", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=None, help=f"asset directory (default ${ENV_ROOT} or .cache/demo)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached assets match the recipe")
    parser.add_argument("--tiny", action="store_true", help="build the seconds-scale test variant")
    parser.add_argument("--corpus-only", action="store_true",
                        help=f"the corpus and its lm-eval tasks alone, no models (default root ${ENV_CORPUS_ROOT} "
                             "or .cache/corpus): what the real-model studies read")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.corpus_only:
        assets = ensure_corpus(args.root.expanduser().resolve() if args.root else None, force=args.force,
                               log=lambda s: print(s, flush=True))
        print(f"corpus at {assets.root}: {', '.join(assets.languages)}; sources "
              + "; ".join(f"{s['name']} {s['version']} ({s['licence']})" for s in assets.metadata["sources"]))
        return 0
    recipe = DemoRecipe.tiny(seed=args.seed) if args.tiny else DemoRecipe(seed=args.seed)
    root = args.root.expanduser().resolve() if args.root else default_root().resolve()
    if not args.force and cached_assets(root, recipe) is not None:
        print(f"demo assets: cache hit at {root}")
    assets = ensure_demo_assets(root, recipe, force=args.force, log=lambda s: print(s, flush=True))
    print(summary_table(assets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
