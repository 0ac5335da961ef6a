"""pytest-benchmark suite of the fused kernels, forward + backward, beside the PyTorch ops they replace.

CPU cases run the Triton side through the interpreter at a micro shape, so the default test run
(``--benchmark-disable``: each body once) keeps every case working; GPU cases use ViT-B/16's
training shapes at batch 256 under bf16 autocast: Triton, eager PyTorch and torch.compile of the
reference. Time them with

    python -m pytest benchmarks/bench_kernels.py -m gpu --benchmark-enable --benchmark-group-by=param:kernel

``benchmarks/kernels_gpu.py`` is the side-by-side report (bytes floor, copy bandwidth, targets,
ViT-B/L/H); this suite tracks one implementation at a time across commits
(``--benchmark-autosave``, ``--benchmark-compare``).
"""

import pytest
import torch

import kernels_gpu  # benchmarks/ is on sys.path while pytest collects this file (rootdir-relative import)
from fastmae.bench.timing import synchronize
from fastmae.kernels._launch import interpreting

MICRO_SHAPE = kernels_gpu.ModelShape("micro/4", 32, 4, 64)


def make_step(kernel: str, impl: str, shape: kernels_gpu.ModelShape, batch: int, device: torch.device):
    torch.manual_seed(0)
    case = kernels_gpu.CASES[kernel](shape, batch, True, device)
    op = kernels_gpu.implementations(kernel)[impl]

    def one_step():
        grads = case.step(op)
        synchronize(device)
        return grads

    one_step()  # warm-up: compilation, autotuning
    return one_step


def all_finite(grads) -> bool:
    return all(bool(torch.isfinite(g).all()) for g in grads if g is not None)


@pytest.mark.skipif(not interpreting(), reason="the Triton side needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.filterwarnings("ignore:.*autocast")
@pytest.mark.parametrize("impl", ["triton", "eager"])  # inductor needs a C++ compiler on CPU
@pytest.mark.parametrize("kernel", list(kernels_gpu.CASES))
def test_kernel_cpu_micro(benchmark, kernel, impl):
    step = make_step(kernel, impl, MICRO_SHAPE, 2, torch.device("cpu"))
    assert all_finite(benchmark(step))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "eager", "compiled"])
@pytest.mark.parametrize("kernel", list(kernels_gpu.CASES))
def test_kernel_gpu_vit_base(benchmark, kernel, impl):
    step = make_step(kernel, impl, kernels_gpu.MODEL_SHAPES["vit_b"], 256, torch.device("cuda"))
    assert all_finite(benchmark.pedantic(step, rounds=20, warmup_rounds=3))
