"""Launch shapes of the memory-bound fused kernels, timed on a GPU: which tiling each should use.

    python benchmarks/kernel_shapes_gpu.py --out benchmarks/results/kernel_shapes_<gpu>_<date>.json

The kernel benchmark (``kernels_gpu.py``) measures each kernel at the launch shape its launcher picks.
Here the decoder unshuffle, the loss and the add + LayerNorm run forward + backward at the training
shapes (batch 256, bf16 autocast) under alternative shapes: rows per tile, tiles per program, warps,
and for the LayerNorm how many programs share the rows; the encoder input runs with its GEMM in
Triton (epilogue fused) and in cuBLAS (then an epilogue kernel). Each launcher makes the choice in one
function (``_launch_shape``; the LayerNorm's ``_tiles`` and ``_grid``; the encoder input's
``_gemm_backend``), which is replaced for the timing. Timing is ``kernels_gpu.Timer``'s: CUDA events
after an L2 flush and a GPU spin that queues the step ahead. The JSON lists every shape's median time
beside the launcher's own choice, so the defaults can be changed to what the GPU prefers.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels_gpu  # noqa: E402  (benchmarks/ is a folder of scripts)


@dataclass(frozen=True)
class Variant:
    """One launch shape: what replaces the launcher's choice (module attribute -> function)."""

    label: str
    settings: dict
    replacements: dict[str, Callable]


def row_tile_variants(module) -> list[Variant]:
    """Decoder unshuffle and loss: RowTiles(block_rows, row_tiles, num_warps) with 1k-8k values per tile
    (1k: one loss row a tile, as inductor's one-row-per-program reductions run)."""
    from fastmae.kernels._launch import RowTiles

    variants = []
    for elements, row_tiles, num_warps in itertools.product((1024, 2048, 4096, 8192), (1, 8), (4, 8)):
        def shape(num_rows, block_width, _e=elements, _t=row_tiles, _w=num_warps):
            return RowTiles(max(1, _e // block_width), _t, _w)

        settings = {"values_per_tile": elements, "row_tiles": row_tiles, "num_warps": num_warps}
        variants.append(Variant(f"{elements} values x {row_tiles} tiles, {num_warps} warps", settings,
                                {"_launch_shape": shape}))
    return variants


def layer_norm_variants(module) -> list[Variant]:
    """Add + LayerNorm: rows per tile, warps, and the grid: the launcher's one wave of programs walking
    the tiles (its ``_grid``), or one program per tile."""
    import triton

    def program_per_tile(num_tiles, num_warps, device):
        return num_tiles, 1

    variants = []
    for block_rows, num_warps, per_tile in itertools.product((1, 2, 4), (4, 8), (True, False)):
        def tiles(num_rows, D, _r=block_rows, _w=num_warps):
            return _r, triton.next_power_of_2(D), _w

        settings = {"block_rows": block_rows, "num_warps": num_warps, "program_per_tile": per_tile}
        variants.append(Variant(f"{block_rows} rows, {num_warps} warps, "
                                + ("a program per tile" if per_tile else "one wave of programs"),
                                settings, {"_tiles": tiles, **({"_grid": program_per_tile} if per_tile else {})}))
    return variants


def gemm_variants(module) -> list[Variant]:
    """Encoder input: its GEMM in Triton with the epilogue fused (the launcher's choice today), or
    cuBLAS (torch.addmm) and an epilogue kernel, as torch.compile of the reference runs it."""
    return [Variant(f"{backend} GEMM", {"gemm": backend}, {"_gemm_backend": lambda *shape, _b=backend: _b})
            for backend in ("triton", "cublas")]


def kernel_modules() -> dict:
    from fastmae.kernels import decoder_input, encoder_input, layer_norm, patch_loss

    return {"encoder_input": (encoder_input, gemm_variants), "decoder_input": (decoder_input, row_tile_variants),
            "masked_patch_loss": (patch_loss, row_tile_variants), "add_layer_norm": (layer_norm, layer_norm_variants)}


def check_same_result(got: torch.Tensor, expected: torch.Tensor) -> None:
    """AssertionError unless a shape's output or gradient equals the launcher's up to the order of its sums:
    another split of a row over warps rounds the LayerNorm's statistics differently, which moves a bf16
    value by an ulp (0.0078 relative). Two ulps of the tensor's dtype (no less than 1e-3), relative to each
    value and, for values near zero, to the tensor's largest: a gradient of ~1e-6 per value is held to
    its own scale."""
    if not expected.is_floating_point():
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        return
    tolerance = max(2 * torch.finfo(expected.dtype).eps, 1e-3)
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * scale)


def measure(kernel: str, shape: kernels_gpu.ModelShape, batch: int, timer, device: torch.device,
            variants: list[Variant] | None = None) -> dict:
    """The launcher's own shape and each variant (default: all), forward + backward: median ms, or the
    error of a shape the GPU refuses. Every variant's gradients are checked against the launcher's."""
    module, make_variants = kernel_modules()[kernel]
    torch.manual_seed(0)
    case = kernels_gpu.CASES[kernel](shape, batch, True, device)
    op = kernels_gpu.implementations(kernel)["triton"]
    expected = case.step(op)
    default = timer(lambda: case.step(op))
    rows = []
    for variant in (make_variants(module) if variants is None else variants):
        with ExitStack() as patches:
            for name, replacement in variant.replacements.items():
                patches.enter_context(mock.patch.object(module, name, replacement))
            try:
                for a, b in zip(case.step(op), expected, strict=True):  # a shape must not change the result
                    check_same_result(a, b)
                times = timer(lambda: case.step(op))
            except Exception as err:  # noqa: BLE001 - a shape the GPU refuses (registers, shared memory)
                rows.append({"label": variant.label, **variant.settings, "error": f"{type(err).__name__}: {err}"[:300]})
                continue
        rows.append({"label": variant.label, **variant.settings, **kernels_gpu.summarize(times, case.bytes_floor)})
    timed = [r for r in rows if "median_ms" in r]
    best = min(timed, key=lambda r: r["median_ms"]) if timed else None
    default_summary = kernels_gpu.summarize(default, case.bytes_floor)
    return {"kernel": kernel, "model": shape.name,
            "shapes": case.shapes, "bytes_floor": case.bytes_floor, "launcher_default": default_summary,
            "variants": rows, "best": best,
            "best_speedup_vs_default": default_summary["median_ms"] / best["median_ms"] if best else None}


def run(args: argparse.Namespace, out: Path | None = None) -> dict:
    from fastmae.bench.environment import environment_info, write_json

    device = torch.device("cuda")
    timer = kernels_gpu.Timer(args.warmup, args.iters, device)
    report = {"benchmark": "kernel_shapes", "what": "fused kernels' launch shapes, forward + backward",
              "environment": environment_info(device),
              "config": {"batch": args.batch, "precision": "amp", "warmup_steps": args.warmup, "timed_steps": args.iters},
              "results": []}
    jobs = [(k, m) for k in args.kernels for m in args.models]
    for kernel, model in jobs:
        entry = measure(kernel, kernels_gpu.MODEL_SHAPES[model], args.batch, timer, device)
        report["results"].append(entry)
        best = entry["best"]
        print(f"{kernel:<18} {entry['model']:<9} launcher {entry['launcher_default']['median_ms']:.3f} ms, best "
              f"{best['median_ms']:.3f} ms ({best['label']}), {entry['best_speedup_vs_default']:.2f}x"
              if best else f"{kernel} {model}: every shape failed", file=sys.stderr)
        report["complete"] = len(report["results"]) == len(jobs)
        report["pending"] = [" ".join(job) for job in jobs[len(report["results"]):]]
        if out is not None:
            write_json(out, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernel_shapes_<gpu>_<date>.json)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--kernels", nargs="+", choices=sorted(kernel_modules()), default=list(kernel_modules()))
    parser.add_argument("--models", nargs="+", choices=sorted(kernels_gpu.MODEL_SHAPES), default=list(kernels_gpu.MODEL_SHAPES))
    args = parser.parse_args(argv)
    if args.batch < 1 or args.warmup < 0 or args.iters < 1:
        parser.error("--batch and --iters must be >= 1, --warmup >= 0")
    if not torch.cuda.is_available():
        print("kernel_shapes_gpu.py times Triton kernels on a CUDA GPU; this machine has none.", file=sys.stderr)
        return 2
    from fastmae.bench.environment import result_filename

    out = Path(args.out) if args.out else Path(__file__).parent / "results" / result_filename("kernel_shapes", torch.device("cuda"))
    run(args, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
