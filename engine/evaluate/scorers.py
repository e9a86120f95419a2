"""The ways lm-eval's loglikelihood requests can be computed (no heavy imports: the CLI reads these).

- `shared_prefix` (default): engine/evaluate/shared_prefix.py, each shared prefix run once;
- `lm_eval`: lm-eval's own HFLM, one full sequence per request.
"""
from __future__ import annotations

SCORERS = ("shared_prefix", "lm_eval")
DEFAULT_SCORER = "shared_prefix"
