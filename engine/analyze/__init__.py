"""What pruning keeps, measured: per-trial statistics (collected during evaluation) and the pure
functions of the three analyses (mask overlap, LAPE neurons, latent subspaces). See docs/analyses.md."""
