"""Measuring one contender: build it, time its training step, and turn the times into img/s, MFU and
peak memory. Shared by ``fastmae bench step`` and ``fastmae bench table2``."""

from __future__ import annotations

import gc
import math

import torch

from fastmae.bench.contenders import Contender
from fastmae.bench.timing import TimingPlan, synchronize, time_steps
from fastmae.flops import device_peak_flops
from fastmae.models import create_model


class BatchTooLarge(RuntimeError):
    """A contender ran out of device memory at this batch size."""


def model_config(name: str, **overrides):
    """The MAEConfig of a named architecture (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        return create_model(name, kernels="torch", **overrides).config


def spec_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The data-sheet peak for this run's matmuls (TF32 for fp32 when torch allows it); None on CPU."""
    if device.type != "cuda":
        return None
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return device_peak_flops(torch.cuda.get_device_name(device), dtype, tf32=tf32)


def peak_memory_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_contender(contender: Contender, images, plan: TimingPlan, device: torch.device, batch_size: int,
                      spec_peak: float | None, gemm_peak: float, progress: bool = True) -> dict:
    peak_memory_reset(device)
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None  # the input batches
    try:
        step = contender.build()
        last_loss = [None]

        def one_step():
            last_loss[0] = step(next(images))

        times = time_steps(one_step, plan, device, batch_size, label=contender.name, progress=progress)
        loss = float(last_loss[0])  # read back once, after timing
    except torch.OutOfMemoryError as err:
        raise BatchTooLarge(f"{contender.name}: out of memory at batch {batch_size}") from err
    finally:
        step = None
        synchronize(device)
    result = {"name": contender.name, "description": contender.description, "precision": contender.precision}
    result.update(times.summary())
    result["step_times_s"] = times.times_s
    achieved = contender.train_flops_per_image * times.images_per_s
    result.update({
        "train_flops_per_image": contender.train_flops_per_image,
        "achieved_flops_per_s": achieved,
        "mfu_spec": achieved / spec_peak if spec_peak else None,
        "mfu_measured_gemm": achieved / gemm_peak,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "resident_before_bytes": resident,  # included in the peak: the synthetic batches on the device
        "last_loss": loss,
    })
    if not math.isfinite(loss):
        result["warning"] = "non-finite loss"
    peak_memory_reset(device)
    return result


def format_row(row: dict) -> str:
    memory = f"{row['peak_memory_bytes'] / 2**30:6.2f} GiB" if row["peak_memory_bytes"] is not None else "     n/a"
    spec = f"{100 * row['mfu_spec']:5.1f}%" if row["mfu_spec"] is not None else "  n/a"
    return (f"  {row['name']:<20} {row['images_per_s']:10.1f} img/s  step {1e3 * row['median_s']:8.2f} ms "
            f"(p10-p90 {1e3 * row['p10_s']:.2f}-{1e3 * row['p90_s']:.2f})  peak {memory}  "
            f"MFU spec {spec}  MFU gemm {100 * row['mfu_measured_gemm']:5.1f}%")


