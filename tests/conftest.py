"""Test-wide setup.

- Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET=1 is set here, before
  any kernel module is imported (fastlm imports its kernel modules lazily, on first use).
  Automatic backend selection never picks the interpreter; tests force it with use_backend.
- GPU tests (``@pytest.mark.gpu``) are skipped where CUDA is unavailable.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
