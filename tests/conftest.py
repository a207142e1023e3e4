"""Shared fixtures: the devices and dtypes every device-generic test runs on.

``device``: ``cpu`` always, ``cuda`` when torch sees a GPU (skipped otherwise, so a CPU-only
CI reports the CUDA cases as skipped rather than silently absent). ``dtype``: float32 and
float64. End-to-end registrations and training runs carry the ``slow`` marker: CI runs them
all; ``python -m pytest -m "not slow"`` is the quick loop while developing.
"""

import pytest
import torch


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="CUDA not available"))])
def device(request) -> str:
    return request.param


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request) -> torch.dtype:
    return request.param
