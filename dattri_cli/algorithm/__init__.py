"""Attributors, one module per family, as in the API reference."""
