"""Evaluation of a model in memory: perplexity and bits per byte per language, and lm-eval tasks."""
