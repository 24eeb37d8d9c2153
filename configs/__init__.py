"""Packaged Hydra configs (mapped from the top-level configs/ folder)."""
