"""pytest-benchmark suite of the MAE training step (forward + backward + AdamW step).

CPU cases use the micro config so that the default test run (``--benchmark-disable``: each body
runs once) stays cheap; GPU cases use ViT-B/16 at 224 px in bf16. Run the timings with

    python -m pytest benchmarks/bench_step.py --benchmark-enable --benchmark-columns=median,iqr,ops

``fastmae bench step`` is the side-by-side comparison with MFU and memory; this suite tracks one
implementation at a time across commits (``--benchmark-autosave``, ``--benchmark-compare``).
"""

import pytest
import torch

from fastmae.bench.contenders import build_contenders
from fastmae.bench.measure import model_config
from fastmae.bench.timing import SyntheticImages, synchronize

CPU_CASES = ["fastmae", "naive w/[M]", "reference-style"]
GPU_CASES = ["fastmae", "fastmae+compile", "fastmae+cudagraph", "naive w/[M]", "reference-style"]


def make_step(name, model, batch, device, dtype):
    config = model_config(model)
    (contender,) = build_contenders(config, device, dtype, 0.75, (name,))
    step = contender.build()
    images = SyntheticImages(batch, config.img_size, device)

    def one_step():
        loss = step(next(images))
        synchronize(device)
        return loss

    for _ in range(2 if device.type == "cuda" else 1):  # warm-up (compilation, cuBLAS heuristics)
        one_step()
    return one_step


@pytest.mark.parametrize("name", CPU_CASES)
def test_step_cpu_micro(benchmark, name):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier on shared CPUs
    try:
        step = make_step(name, "mae_vit_micro_patch4", 16, torch.device("cpu"), torch.float32)
        loss = benchmark(step)
    finally:
        torch.set_num_threads(previous)
    assert torch.isfinite(loss)


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_CASES)
def test_step_gpu_vit_base(benchmark, name):
    step = make_step(name, "mae_vit_base_patch16", 128, torch.device("cuda"), torch.bfloat16)
    loss = benchmark.pedantic(step, rounds=20, warmup_rounds=3)
    assert torch.isfinite(loss)
