"""dattri-cli: training-data attribution for PyTorch, driven by Hydra configs."""

__version__ = "0.1.0"
