"""Evaluation of a model in memory: perplexity per language (lm-eval tasks arrive with issue 4)."""
