"""Saving a pruned model in Hugging Face format, with a model card that says how it was made."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from engine.io import temporary_sibling

CARD = """---
library_name: transformers
tags: [pruned, {method}, calibration-sweep]
base_model: {base}
---
# {name}

`{base}` pruned with **{method}** to sparsity **{sparsity}** of its decoder linear layers, calibrated on
**{calibration}** text ({samples} windows of {seq_len} tokens, seed {seed}), by
[calibration-sweep](https://pypi.org/project/calibration-sweep/) (trial key `{key}`).

The pruned weights are stored as dense tensors with zeros where weights were removed; the file loads with
`AutoModelForCausalLM.from_pretrained` like the base model.

## Evaluation (as measured in the sweep)

| language | task | metric | value |
|---|---|---|---|
{rows}
"""


def model_card(base: str, name: str, key: str, pruning: dict, calibration: dict | None, metrics: list[dict]) -> str:
    rows = "\n".join(f"| {m['language']} | {m['task']} | {m['metric']} | {m['value']:.6g} |" for m in metrics
                     if isinstance(m.get("value"), (int, float)))
    cal = calibration or {}
    return CARD.format(base=base, name=name, key=key, method=pruning.get("method"), sparsity=pruning.get("sparsity"),
                       calibration=cal.get("languages", "no (magnitude needs none)"), samples=cal.get("samples", 0),
                       seq_len=cal.get("seq_len", 0), seed=cal.get("seed"), rows=rows)


def save_pruned_model(model, tokenizer, directory: Path, card: str, details: dict) -> Path:
    """Writes the model, its tokenizer, README.md (the card) and trial.json into `directory`, whole or not
    at all: everything goes to a temporary sibling first, which is then renamed."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(directory)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    (temporary / "README.md").write_text(card, encoding="utf-8")
    (temporary / "trial.json").write_text(json.dumps(details, indent=1, default=str) + "\n", encoding="utf-8")
    # safetensors writes its files with mode 0600 whatever the umask, so on a shared study directory
    # nobody but the sweep's own user could load the weights (with lm_eval or anything else). Give every
    # file the mode an ordinary write would: the umask's, read off the directory save_pretrained made.
    readable = temporary.stat().st_mode & 0o666
    for path in temporary.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(readable)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(temporary, directory)
    return directory
