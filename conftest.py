"""Shared by tests/ and benchmarks/: the Triton interpreter on machines without CUDA, gpu-marked
tests skipped there, and a fixed seed per test."""

import os

import pytest
import torch

# Triton kernels run on CPU through the interpreter; it must be switched on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
