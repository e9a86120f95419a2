"""Text for calibration and evaluation (issue 4 adds sampling, mixtures and caching)."""
