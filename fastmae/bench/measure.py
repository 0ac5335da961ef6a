"""Measuring one contender: build it, time its training step, and turn the times into img/s, MFU and
peak memory. Shared by ``fastmae bench step`` and ``fastmae bench table2``."""

from __future__ import annotations

import argparse
import gc
import math

import torch

from fastmae.attention import check_attention_backend
from fastmae.bench.contenders import Contender
from fastmae.bench.environment import resolve_dtype
from fastmae.bench.timing import TimingPlan, synchronize, time_steps
from fastmae.compiling import COMPILE_MODES, COMPILE_SCOPES, CompileConfig
from fastmae.device import device_from_flag
from fastmae.flops import device_peak_flops, token_counts
from fastmae.kernels import resolve_kernels
from fastmae.models import MODEL_ARCHS, create_model


def add_measurement_arguments(parser: argparse.ArgumentParser, cpu_batch: int, oom_fallback: bool = False) -> None:
    """The flags every step-timing command shares (bench step, bench table2). ``oom_fallback``: whether
    halving the batch on out-of-memory is the default (then --no_oom_fallback turns it off)."""
    parser.add_argument("--batch_size", type=int, default=None, help=f"default: 256 on CUDA, {cpu_batch} on CPU")
    fallback = parser.add_mutually_exclusive_group()
    fallback.add_argument("--oom_fallback", action="store_true", default=oom_fallback,
                          help="on out-of-memory halve the batch and measure again (the batch is recorded per result)"
                               + (" (the default)" if oom_fallback else ""))
    if oom_fallback:
        fallback.add_argument("--no_oom_fallback", dest="oom_fallback", action="store_false",
                              help="on out-of-memory stop with an error instead of halving the batch")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--mask_ratio", type=float, default=0.75, help="fraction of patches removed")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 10 CUDA, 2 CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 CUDA, 5 CPU)")
    parser.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                        help="the fused kernels: auto = Triton on CUDA, the PyTorch references elsewhere")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "xformers", "math"], help="attention of fastmae's rows")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def add_compile_arguments(parser: argparse.ArgumentParser, rows: str) -> None:
    """How the compiled rows (``rows``) are compiled (see fastmae.compiling)."""
    parser.add_argument("--compile_backend", default="inductor", help=f"torch.compile backend of {rows}")
    parser.add_argument("--compile_scope", default="model", choices=COMPILE_SCOPES,
                        help=f"{rows}: the whole model as one graph, or each transformer block on its own")
    parser.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                        help=f"torch.compile mode of {rows} (reduce-overhead: CUDA graphs)")


def compile_config(args: argparse.Namespace) -> CompileConfig:
    """The CompileConfig of add_compile_arguments' flags; ValueError naming the bad flag."""
    try:
        return CompileConfig(args.compile_scope, args.compile_mode, args.compile_backend)
    except ValueError as err:
        raise ValueError(f"--compile_scope/--compile_mode/--compile_backend: {err}") from None


def default_batch_size(device: torch.device, cpu_batch: int) -> int:
    return 256 if device.type == "cuda" else cpu_batch


def engine_tag(kernels: str, attn: str) -> str:
    """A file-name part for engine settings other than the defaults (Triton kernels where they run, SDPA)."""
    return ("" if kernels == "auto" else f"_kernels-{kernels}") + ("" if attn == "sdpa" else f"_attn-{attn}")


def resolve_measurement(args: argparse.Namespace, cpu_batch: int) -> tuple[torch.device, torch.dtype, int, TimingPlan]:
    """Device, dtype, batch size and timing plan from the shared flags; fills in the per-device
    defaults of --warmup and --steps. Raises ValueError naming a bad flag."""
    device = device_from_flag(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cuda = device.type == "cuda"
    batch_size = args.batch_size if args.batch_size is not None else default_batch_size(device, cpu_batch)
    if batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
    args.warmup = (10 if cuda else 2) if args.warmup is None else args.warmup
    args.steps = (30 if cuda else 5) if args.steps is None else args.steps
    check_engine_flags(args.kernels, args.attn, device)
    return device, dtype, batch_size, TimingPlan(args.warmup, args.steps)


def check_engine_flags(kernels: str, attn: str, device: torch.device) -> None:
    """--kernels and --attn can run here (Triton on CPU needs its interpreter; xformers must be
    installed): found out before anything is measured, not as every row's failure."""
    try:
        resolve_kernels(kernels, device)
    except ValueError as err:
        raise ValueError(f"--kernels {kernels}: {err}") from None
    try:
        check_attention_backend(attn)
    except ValueError as err:
        raise ValueError(f"--attn {attn}: {err}") from None


def check_model_names(names, mask_ratio: float) -> None:
    for name in names:
        if name not in MODEL_ARCHS:
            raise ValueError(f"unknown model {name!r}; choose from {sorted(MODEL_ARCHS)}")
        token_counts(model_config(name), mask_ratio)  # a mask ratio that leaves patches visible


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
    plan = TimingPlan(max(plan.warmup_steps, contender.untimed_steps), plan.timed_steps)
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
    result["warmup_steps"] = plan.warmup_steps
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
    warnings = ["non-finite loss"] if not math.isfinite(loss) else []
    if result["mfu_measured_gemm"] > 1.0:  # no step outruns its own GEMMs: the GEMM rate was measured slower
        warnings.append("above the GEMM rate measured at the start: the machine's load changed during the run, "
                        "rerun on an idle machine")
    if result["relative_spread"] > NOISY_SPREAD:
        warnings.append(f"step times spread {100 * result['relative_spread']:.0f}% of the median (p10-p90): a busy "
                        "machine; compare rows of a quieter run")
    if warnings:
        result["warning"] = "; ".join(warnings)
    peak_memory_reset(device)
    return result


# a p10-p90 spread beyond half the median step: the timing measured the machine's other work too
NOISY_SPREAD = 0.5


def format_row(row: dict) -> str:
    memory = f"{row['peak_memory_bytes'] / 2**30:6.2f} GiB" if row["peak_memory_bytes"] is not None else "     n/a"
    spec = f"{100 * row['mfu_spec']:5.1f}%" if row["mfu_spec"] is not None else "  n/a"
    return (f"  {row['name']:<20} {row['images_per_s']:10.1f} img/s  step median {1e3 * row['median_s']:8.2f} ms "
            f"(p10-p90 {1e3 * row['p10_s']:.2f}-{1e3 * row['p90_s']:.2f})  peak {memory}  "
            f"MFU spec {spec}  MFU gemm {100 * row['mfu_measured_gemm']:5.1f}%"
            + (f"  first step {row['first_step_s']:.1f} s" if row.get("first_step_s") is not None else "")
            + (f"\n    warning: {row['warning']}" if row.get("warning") else ""))


