"""Pruning: methods (params, pruners, scoring, masks, sparsegpt_math), the layer-by-layer driver
(sequential, block_inputs, layers), calibration statistics, sparsity targets and mask files."""
