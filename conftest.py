"""Shared by tests/ and benchmarks/: the Triton interpreter on machines without CUDA, gpu-marked
tests skipped there, tests not marked gpu kept on the CPU everywhere, and a fixed seed per test."""

import os

import pytest
import torch

pytest_plugins = ("pytester",)  # tests/test_test_setup.py runs this conftest on a pretend GPU machine

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


@pytest.fixture(autouse=True)
def _cpu_unless_marked_gpu(request, monkeypatch):
    """On a machine with a GPU, commands left to pick their device would pick CUDA, bf16 and the GPU
    loaders, and the CPU tests would check something else there than in CI: they see no GPU."""
    if "gpu" not in request.keywords and torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
