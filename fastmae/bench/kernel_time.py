"""Device time of a training step by kernel, and by kind of kernel: matrix products, attention,
fastmae's Triton kernels, normalisation, the optimizer, GELU, casts and copies, reductions, the rest
(mostly element-wise). The step's phases say where the time goes; this says what kind of work fills
it, so which fusion would pay.

torch.profiler records the kernels. On CPU, where there are none, the ATen operators' own time
stands in (it only shows that the code runs).
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# First match wins. Kernel names as cuBLAS (nvjet, *gemm*, cutlass), FlashAttention and cuDNN (flash,
# fmha, sdpa), our Triton kernels and ATen (the operator names, on CPU) give them.
KINDS = (
    ("fastmae triton", re.compile(
        r"^_(visible_patch_embed|patch_rows|position_epilogue|decoder_unshuffle|add_layer_norm|masked_patch_loss|resize_rows|"
        r"resize_columns)_")),
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|matmul|addmm|aten::mm$|aten::bmm$|aten::linear$", re.I)),
    ("normalization", re.compile(r"layer_?norm", re.I)),
    ("optimizer", re.compile(r"adam|foreach|multi_tensor", re.I)),
    # what a fusion could remove, kept apart from the rest: the GELU and its backward, the dtype casts
    # and copies (autocast's weight casts and their backward, stack/cat), and the reductions (bias
    # gradients are sums over the rows)
    ("activation (GELU)", re.compile(r"gelu", re.I)),
    ("casts and copies", re.compile(r"copy_kernel|CatArrayBatchedCopy|^aten::(_to_copy|copy_|stack|cat|clone)$")),
    ("reductions", re.compile(r"reduce_kernel|^aten::sum$")),
)
OTHER = "element-wise and other"
NAME_CHARS = 160  # C++ template kernel names run to thousands of characters


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), OTHER)


def step_kernel_times(step: Callable[[], object], device: torch.device, steps: int = 3, top: int = 15) -> dict:
    """Profile ``steps`` calls of ``step`` (a whole training step, already warmed up) -> device time
    per step by kind of kernel, and the ``top`` kernels by device time."""
    if steps < 1 or top < 0:
        raise ValueError(f"need steps >= 1 and top >= 0, got {steps}, {top}")
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as recorded:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    rows = []
    for event in recorded.key_averages():
        if cuda:  # kernels only: an operator's device time repeats its kernels'
            seconds = event.self_device_time_total / 1e6 if event.device_type == DeviceType.CUDA else 0.0
        else:
            seconds = event.self_cpu_time_total / 1e6
        if seconds > 0:
            rows.append({"name": event.key[:NAME_CHARS], "kind": kernel_kind(event.key),
                         "calls_per_step": event.count / steps, "seconds_per_step": seconds / steps})
    total = sum(row["seconds_per_step"] for row in rows)
    if total == 0:
        raise RuntimeError("the profiler recorded no device time: did the step run on this device?")
    by_kind: dict[str, dict] = {}
    for kind in [k for k, _ in KINDS] + [OTHER]:
        seconds = sum(row["seconds_per_step"] for row in rows if row["kind"] == kind)
        by_kind[kind] = {"seconds_per_step": seconds, "share": seconds / total}
    rows.sort(key=lambda row: row["seconds_per_step"], reverse=True)
    for row in rows:
        row["share"] = row["seconds_per_step"] / total
    return {"profiled_steps": steps, "what": "CUDA kernels" if cuda else "ATen operators (CPU self time)",
            "seconds_per_step": total, "by_kind": by_kind, "top": rows[:top]}


def device_busy_fraction(times: dict, step_seconds: float) -> float:
    """The share of a step (timed without the profiler) during which kernels ran. Well below 1, the GPU
    waits between kernels: for the host's launches, when the step is too short to hide them."""
    return times["seconds_per_step"] / step_seconds


def format_kernel_times(times: dict) -> str:
    lines = [f"Device time by kind ({times['what']}, {times['profiled_steps']} profiled steps): "
             f"{1e3 * times['seconds_per_step']:.2f} ms per step"]
    if "device_busy_fraction" in times:
        lines[0] += (f", kernels running {100 * times['device_busy_fraction']:.0f}% of the step "
                     "(the rest: the GPU waiting, mostly for the host's launches)")
    for kind, entry in times["by_kind"].items():
        lines.append(f"  {kind:<24} {1e3 * entry['seconds_per_step']:9.2f} ms  {100 * entry['share']:5.1f}%")
    if times["top"]:
        lines.append("Largest:")
    for row in times["top"]:
        lines.append(f"  {1e3 * row['seconds_per_step']:8.2f} ms {100 * row['share']:5.1f}%  "
                     f"x{row['calls_per_step']:<5g} {row['kind']:<24} {row['name'][:90]}")
    return "\n".join(lines)
