"""The matmul rate this device reaches in this run: the practical peak that MFU is also quoted against."""

from __future__ import annotations

import time

import torch

from fastmae.bench.timing import synchronize


def measured_gemm_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 3) -> dict:
    """FLOP/s of square ``size`` x ``size`` matmuls in ``dtype`` (best of ``repeats`` timed bursts).

    size defaults to 8192 on CUDA (large enough to saturate tensor cores) and 1024 on CPU.
    """
    if size is None:
        size = 8192 if device.type == "cuda" else 1024
    if size < 1 or repeats < 1:
        raise ValueError(f"GEMM size and repeats must be positive, got {size}, {repeats}")
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    per_burst = 10 if device.type == "cuda" else 3
    for _ in range(3):  # warm-up: cuBLAS heuristics, clocks
        torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_burst):
                torch.mm(a, b, out=out)
            end.record()
            synchronize(device)
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(per_burst):
                torch.mm(a, b, out=out)
            seconds = time.perf_counter() - t0
        best = max(best, 2.0 * size**3 * per_burst / seconds)
    return {"flops_per_s": best, "size": size, "dtype": str(dtype).removeprefix("torch.")}
