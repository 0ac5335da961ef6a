"""The matmul rate this device reaches in this run: the practical peak that MFU is also quoted against."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from fastmae.bench.timing import synchronize

# The layouts of a training step's matmuls, as the model calls them: the forward's x @ W^T (F.linear),
# the input gradient's g @ W and the weight gradient's g^T @ x. Their rates differ by 20x on some
# devices (CPU fp16: F.linear takes a fast path that torch.mm, with or without out=, does not): the
# fastest of them is what bounds the model's matmuls, not one of them alone.
GEMM_LAYOUTS = {
    "x @ W^T (F.linear)": lambda a, b: F.linear(a, b),
    "g @ W (torch.mm)": lambda a, b: torch.mm(a, b),
    "g^T @ x (torch.mm)": lambda a, b: torch.mm(a.t(), b),
}
# A layout this many times slower than the fastest so far on its first call is not measured further:
# warm-up effects do not explain such a gap, and on CPU each of its calls can take seconds.
LEFT_OUT_BELOW = 4.0


def measured_gemm_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 3) -> dict:
    """FLOP/s of square ``size`` x ``size`` matmuls in ``dtype``: the best of ``repeats`` timed bursts in
    the fastest of GEMM_LAYOUTS (``per_layout_flops_per_s`` has each; a layout left out after its
    first call has that call's rate).

    size defaults to 8192 on CUDA (large enough to saturate tensor cores) and 1024 on CPU.
    """
    if size is None:
        size = 8192 if device.type == "cuda" else 1024
    if size < 1 or repeats < 1:
        raise ValueError(f"GEMM size and repeats must be positive, got {size}, {repeats}")
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    flops = 2.0 * size**3
    per_burst = 10 if device.type == "cuda" else 3
    rates: dict[str, float] = {}
    for name, matmul in GEMM_LAYOUTS.items():
        fastest = max(rates.values(), default=0.0)
        first = flops / _seconds(lambda: matmul(a, b), device)  # also the warm-up: cuBLAS heuristics, clocks
        if first * LEFT_OUT_BELOW < fastest:
            rates[name] = first
            continue
        for _ in range(2):
            matmul(a, b)
        best = 0.0
        for _ in range(repeats):
            seconds = _seconds(lambda: _repeat(matmul, a, b, per_burst), device)
            best = max(best, flops * per_burst / seconds)
        rates[name] = best
    layout = max(rates, key=rates.get)
    return {"flops_per_s": rates[layout], "size": size, "dtype": str(dtype).removeprefix("torch."),
            "layout": layout, "per_layout_flops_per_s": rates}


def _repeat(matmul, a: torch.Tensor, b: torch.Tensor, times: int) -> None:
    for _ in range(times):  # each product dropped at once: a burst holds one output at a time
        matmul(a, b)


def _seconds(work, device: torch.device) -> float:
    """Seconds ``work`` takes on ``device``: CUDA events there, the host clock on CPU (synchronous)."""
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0
