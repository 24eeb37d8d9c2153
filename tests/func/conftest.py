"""Shared fixtures of the numerical-primitive tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64_default():
    """Build tensors and modules in float64 for the test (closed forms compared to tight tolerances)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
