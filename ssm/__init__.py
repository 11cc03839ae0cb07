"""Composition and training: hybrid models built from `layers`, configs, data, sharded training."""
