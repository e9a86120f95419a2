"""Real pretrained models installed offline from the package index (engine.pretrained.build)."""
