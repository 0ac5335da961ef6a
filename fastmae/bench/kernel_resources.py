"""``fastmae kernels compile``: the Triton kernels of a training step, compiled for an H100 (sm_90)
or A100 (sm_80) on any machine, with what each costs: registers, register spills, shared memory.

A spill (ptxas stack frame) costs local-memory traffic on every use; a config whose shared memory
does not fit is refused by the GPU (the autotuner skips it, after compiling it for nothing). Both
are visible before any GPU is at hand. The workloads are the model's own calls:

- ``train``: forward with the prediction head on the removed patches, backward (pretraining);
- ``naive``: the naive baseline (mask tokens through the encoder), forward and backward;
- ``full_pred``: forward with every patch predicted, no gradient (visualisation, parity checks);

each with and without norm_pix_loss, under the autocast dtype of ``--precision``, and each with both
routes of the encoder input's GEMM (cuBLAS then a Triton epilogue, the default; a Triton GEMM with
the epilogue fused). Depth does not
change which kernels run, so the model is built one block deep; the batch (default 16, divisible
by 16 like real batches) keeps Triton's integer specialisations those of a real run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fastmae.bench.environment import DTYPES, environment_info, write_json
from fastmae.bench.measure import check_model_names
from fastmae.models import MODEL_ARCHS, create_model

WORKLOADS = ("train", "naive", "full_pred")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", default=["mae_vit_large_patch16"], help=f"any of {sorted(MODEL_ARCHS)}")
    parser.add_argument("--arch", nargs="+", type=int, default=[90, 80], help="90: H100/H200, 80: A100")
    parser.add_argument("--precision", nargs="+", default=["bf16"], choices=sorted(DTYPES),
                        help="autocast dtype of the step (fp32: no autocast), as pretrain --precision; fp16 takes "
                             "minutes, the model's own half-precision backward being slow on a CPU")
    parser.add_argument("--workload", nargs="+", default=list(WORKLOADS), choices=WORKLOADS,
                        help="the model shapes the kernels are compiled for")
    parser.add_argument("--batch_size", type=int, default=16, help="batch of the shapes compiled for")
    parser.add_argument("--json", default=None, help="write every compiled kernel's record here")


def run_workload(model, imgs: torch.Tensor, workload: str, autocast_dtype: torch.dtype | None) -> None:
    """One call of the model as the workload makes it (outputs are never read: nothing ran)."""
    autocast = torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    if workload == "full_pred":
        with torch.no_grad(), autocast:
            model(imgs, full_pred=True)
        return
    with autocast:
        loss, _, _ = model(imgs, full_pred=False)
    loss.backward()


def compile_step_kernels(model_name: str, arch: int, precision: str, workloads=WORKLOADS, batch_size: int = 16):
    """-> the kernels (one record per compiled specialisation) the model's calls launch on sm_<arch>."""
    from fastmae.kernels.cross_compile import CompileOnlyDriver
    from fastmae.kernels.encoder_input import GEMM_ROUTES, gemm_route

    if batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
    autocast_dtype = None if precision == "fp32" else DTYPES[precision]
    records = []
    with CompileOnlyDriver(arch) as gpu:
        for route in GEMM_ROUTES:
            for norm_pix_loss in (False, True):
                for workload in workloads:
                    model = create_model(model_name, kernels="triton", depth=1, decoder_depth=1,
                                         norm_pix_loss=norm_pix_loss, encoder_mask_tokens=workload == "naive")
                    imgs = torch.randn(batch_size, model.config.in_chans, model.config.img_size, model.config.img_size)
                    first = len(gpu.compiled)
                    with gemm_route(route):
                        run_workload(model, imgs, workload, autocast_dtype)
                    for record in gpu.compiled[first:]:  # what this route adds: kernels compile once
                        records.append({"model": model_name, "precision": precision, "workload": workload,
                                        "norm_pix_loss": norm_pix_loss, "gemm_route": route, **record.as_dict()})
    return records


def format_table(records: list[dict]) -> str:
    lines = [f"{'kernel':30s} {'workload':9s} {'switches on':31s} {'tiles':30s} {'warps':>5s} {'stages':>6s} "
             f"{'regs':>5s} {'spill B':>7s} {'smem KiB':>8s}  {'global memory instructions (bits x count)':50s} fits"]
    for r in records:
        tiles = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in r["tiles"].items())
        switches = " ".join(k for k, v in r["constants"].items() if v is True) or "-"
        regs = "-" if r["registers"] is None else str(r["registers"])
        spill = "-" if r["spill_bytes"] is None else str(r["spill_bytes"])
        fits = "yes" if r["fits"] else f"NO: {r['refusal']}"
        lines.append(f"{r['name'].strip('_'):30s} {r['workload']:9s} {switches:31s} {tiles:30s} {r['num_warps']:5d} "
                     f"{r['num_stages']:6d} {regs:>5s} {spill:>7s} {r['shared_bytes'] / 1024:8.1f}  "
                     f"{format_memory_instructions(r['memory_instructions']):50s} {fits}")
    return "\n".join(lines)


def format_memory_instructions(memory: dict) -> str:
    """{"LDG": {"128": 16, "32": 128}} -> "LDG 128x16 32x128", widest first."""
    parts = []
    for kind in ("LDG", "LDGSTS", "STG"):
        widths = sorted(memory.get(kind, {}).items(), key=lambda item: -int(item[0]))
        if widths:
            parts.append(kind + " " + " ".join(f"{bits}x{count}" for bits, count in widths))
    return "; ".join(parts) or "-"


def format_summary(summary: dict) -> str:
    return (f"{summary['compiled']} compiled specialisations of {len(summary['kernels'])} kernels; "
            f"{summary['spilling']} with register spills, {summary['refused']} the GPU would refuse; "
            f"at most {summary['max_registers']} registers per thread")


def summarize(records: list[dict]) -> dict:
    spilling = [r for r in records if r["spill_bytes"]]
    refused = [r for r in records if not r["fits"]]
    return {
        "compiled": len(records),
        "kernels": sorted({r["name"] for r in records}),
        "spilling": len(spilling),
        "refused": len(refused),
        "max_registers": max((r["registers"] or 0 for r in records), default=0),
    }


def _compile_all(args: argparse.Namespace) -> list[dict]:
    """Every kernel record of every --arch, --precision and --model; ValueError for what cannot run."""
    check_model_names(args.model, mask_ratio=0.75)
    try:
        import triton  # noqa: F401
    except ImportError:
        raise ValueError("Triton is not installed (pip install 'fastmae[triton]')") from None
    from fastmae.kernels._launch import interpreting

    if interpreting():
        raise ValueError("TRITON_INTERPRET=1 makes Triton interpret the kernels, which cannot then be compiled; "
                         "unset it")
    results = []
    for arch in args.arch:
        for precision in args.precision:
            for model_name in args.model:
                records = compile_step_kernels(model_name, arch, precision, args.workload, args.batch_size)
                print(f"\n{model_name}, sm_{arch}, {precision}: {format_summary(summarize(records))}")
                print(format_table(records))
                results.extend(records)
    return results


def run(args: argparse.Namespace) -> int:
    try:
        results = _compile_all(args)
    except ValueError as err:
        print(f"fastmae kernels compile: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        env = environment_info(torch.device("cpu"))
        path = write_json(Path(args.json), {"what": "kernel_resources", "environment": env,
                                            "summary": summarize(results), "kernels": results})
        print(f"\nwrote {path}")
    return 0
