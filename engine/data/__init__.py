"""Text for calibration and evaluation: sources, calibration windows and mixtures, and their cache."""
