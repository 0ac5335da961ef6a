"""GPU benchmark of the fused kernels against the PyTorch ops they replace.

    python benchmarks/kernels_gpu.py --out benchmarks/results/kernels_<gpu>_<date>.json   (and .png)

Per kernel (encoder input, decoder input, loss, residual add + norm), per model shape (ViT-B/16,
ViT-L/16, ViT-H/14 at 224 px, mask ratio 0.75, decoder width 512), batch 256, forward + backward:

- time with CUDA events after warm-up; median and spread over the timed steps; the L2 cache is
  flushed (a 512 MiB write) before every step, which also lets the host queue the step's launches
  ahead of the GPU, so launch overhead is not what is timed;
- the bytes floor (the least traffic any implementation of the same fwd + bwd must move) and the
  achieved GB/s on it; a device-to-device copy of the same number of bytes, timed the same way in
  the same run, gives the copy bandwidth the targets are stated against;
- three implementations: the Triton kernels ("triton"), the eager reference functions ("eager"),
  and torch.compile of the reference functions ("compiled", inductor, default mode);
- for each, the device time of its kernels in the step (torch.profiler, ``kernel_time`` in the
  JSON): which of them a slow implementation loses its time in.

Two precision settings: "amp" is what the model sees under bf16 autocast (fp32 images, parameters
and position tables; bf16 activations), "bf16" has every tensor in bf16. Targets (issue 4): >= 70%
of the copy bandwidth on the floor, >= 2x faster than eager, not slower than compiled.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

MASK_RATIO = 0.75
DECODER_DIM = 512


@dataclass(frozen=True)
class ModelShape:
    name: str
    img_size: int
    patch_size: int
    embed_dim: int

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_visible(self) -> int:
        return int(self.num_patches * (1 - MASK_RATIO))

    @property
    def patch_values(self) -> int:  # C * p * p
        return 3 * self.patch_size**2


MODEL_SHAPES = {
    "vit_b": ModelShape("ViT-B/16", 224, 16, 768),
    "vit_l": ModelShape("ViT-L/16", 224, 16, 1024),
    "vit_h": ModelShape("ViT-H/14", 224, 14, 1280),
}


@dataclass
class KernelCase:
    """One fwd + bwd of one op, for any implementation with the reference's signature."""

    kernel: str
    shapes: dict
    step: Callable[[Callable], tuple]  # step(op): forward and backward of op on fixed inputs -> the input gradients
    bytes_floor: int
    floor_note: str
    flops: int = 0


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def encoder_case(shape: ModelShape, batch: int, amp: bool, device: torch.device) -> KernelCase:
    from fastmae.masking import random_masking

    N, L, K, D, KP, p = batch, shape.num_patches, shape.num_visible, shape.embed_dim, shape.patch_values, shape.patch_size
    data = torch.float32 if amp else torch.bfloat16  # images, parameters, position table
    imgs = torch.randn(N, 3, shape.img_size, shape.img_size, device=device, dtype=data)
    ids_keep = random_masking(N, L, MASK_RATIO, device).ids_keep
    weight = (torch.randn(D, 3, p, p, device=device, dtype=data) / KP**0.5).requires_grad_()
    bias = torch.zeros(D, device=device, dtype=data, requires_grad=True)
    cls = torch.randn(1, 1, D, device=device, dtype=data, requires_grad=True)
    pos = torch.randn(1, L + 1, D, device=device, dtype=data)
    grad_out = torch.randn(N, K + 1, D, device=device, dtype=data)

    def step(op):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = op(imgs, ids_keep, weight, bias, pos, cls, p)
        return torch.autograd.grad(out, (weight, bias, cls), grad_out)

    pixels = N * K * KP * _size(data)
    out_bytes = N * (K + 1) * D * _size(data)
    w_bytes = D * KP * 2  # the projection's weight and its gradient, in bf16
    floor = (2 * pixels + 2 * out_bytes + 2 * w_bytes + (L + 1) * D * _size(data) + 2 * N * K * 8)
    note = ("fwd: visible pixels, weight, pos table, ids -> out; bwd: grad_out, visible pixels again, ids -> "
            "weight grad (bias, cls grads negligible)")
    return KernelCase("encoder_input", dict(N=N, L=L, K=K, D=D, patch=p), step, floor, note,
                      flops=2 * (2 * N * K * KP * D))


def decoder_case(shape: ModelShape, batch: int, amp: bool, device: torch.device) -> KernelCase:
    from fastmae.masking import random_masking

    N, L, K, D = batch, shape.num_patches, shape.num_visible, DECODER_DIM
    params = torch.float32 if amp else torch.bfloat16
    out_dtype = params  # promote(bf16 x, params)
    x = torch.randn(N, K + 1, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    mask_token = torch.randn(1, 1, D, device=device, dtype=params, requires_grad=True)
    pos = torch.randn(1, L + 1, D, device=device, dtype=params)
    ids_restore = random_masking(N, L, MASK_RATIO, device).ids_restore
    grad_out = torch.randn(N, L + 1, D, device=device, dtype=out_dtype)

    def step(op):
        out = op(x, mask_token, ids_restore, pos)
        return torch.autograd.grad(out, (x, mask_token), grad_out)

    x_bytes = N * (K + 1) * D * 2
    out_bytes = N * (L + 1) * D * _size(out_dtype)
    floor = 2 * x_bytes + 2 * out_bytes + 2 * N * L * 8 + (L + 1) * D * _size(params)
    note = "fwd: x, ids_restore, pos table -> out; bwd: grad_out, ids_restore -> grad x (mask-token grad negligible)"
    return KernelCase("decoder_input", dict(N=N, L=L, K=K, D=D), step, floor, note)


def loss_case(shape: ModelShape, batch: int, amp: bool, device: torch.device) -> KernelCase:
    from fastmae.masking import random_masking

    N, L, P, p = batch, shape.num_patches, shape.patch_values, shape.patch_size
    masking = random_masking(N, L, MASK_RATIO, device)
    M = L - masking.num_visible
    img_dtype = torch.float32 if amp else torch.bfloat16
    imgs = torch.randn(N, 3, shape.img_size, shape.img_size, device=device, dtype=img_dtype)
    pred = torch.randn(N, M, P, device=device, dtype=torch.bfloat16, requires_grad=True)

    def step(op):  # training: the head predicts the removed patches only, norm_pix_loss on
        loss = op(pred, imgs, p, True, masking.ids_masked, None)
        # the loss too: the launch shape sets how its partial sums are added, and d(pred) alone (~1e-6
        # per value) would pass any closeness check
        return (loss.detach(), *torch.autograd.grad(loss, (pred,)))

    pred_bytes = N * M * P * 2
    reads = pred_bytes + N * M * P * _size(img_dtype) + N * M * 8
    # The incoming gradient is unknown until backward (reading it earlier would synchronise), so a
    # fwd + bwd must either store d(loss)/d(pred) and scale it (write, read, write) or read pred and
    # the pixels twice; the floor is the cheaper of the two.
    floor = min(reads + 3 * pred_bytes, 2 * reads + pred_bytes)
    note = "min(store-and-scale, recompute) of: pred, removed patches' pixels, ids -> d pred"
    return KernelCase("masked_patch_loss", dict(N=N, L=L, M=M, P=P, patch=p), step, floor, note)


def norm_case(shape: ModelShape, batch: int, amp: bool, device: torch.device) -> KernelCase:
    """An encoder block's middle residual add + norm2 at the training shape (K+1 tokens per image)."""
    N, K, D = batch, shape.num_visible, shape.embed_dim
    stream = torch.float32 if amp else torch.bfloat16  # the residual stream, LayerNorm parameters
    x = torch.randn(N, K + 1, D, device=device, dtype=stream, requires_grad=True)
    branch = torch.randn(N, K + 1, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(D, device=device, dtype=stream, requires_grad=True)
    bias = torch.zeros(D, device=device, dtype=stream, requires_grad=True)
    grad_residual = torch.randn(N, K + 1, D, device=device, dtype=stream)
    grad_out = torch.randn(N, K + 1, D, device=device, dtype=torch.bfloat16)

    def step(op):  # out in bf16: what the next Linear consumes under autocast
        residual, out = op(x, branch, weight, bias, 1e-6, torch.bfloat16)
        return torch.autograd.grad((residual, out), (x, branch, weight, bias), (grad_residual, grad_out))

    rows, s = N * (K + 1) * D, _size(stream)
    # fwd: x, branch -> residual, out; bwd: grad_out, grad_residual, residual -> grad x (and grad
    # branch, a second write only when its dtype differs); weight, bias, mean, rstd are negligible
    floor = rows * ((s + 2 + s + 2) + (2 + s + s + s + (2 if amp else 0)))
    note = "fwd: x, branch -> residual, out; bwd: grad_out, grad_residual, residual -> grad x (+ grad branch if dtypes differ)"
    return KernelCase("add_layer_norm", dict(N=N, T=K + 1, D=D), step, floor, note)


CASES = {"encoder_input": encoder_case, "decoder_input": decoder_case, "masked_patch_loss": loss_case,
         "add_layer_norm": norm_case}


def implementations(kernel: str) -> dict[str, Callable]:
    from fastmae.kernels import decoder_input, encoder_input, layer_norm, patch_loss

    triton_fn, reference = {
        "encoder_input": (encoder_input.visible_patch_embed_triton, encoder_input.visible_patch_embed_reference),
        "decoder_input": (decoder_input.decoder_unshuffle_triton, decoder_input.decoder_unshuffle_reference),
        "masked_patch_loss": (patch_loss.masked_patch_loss_triton, patch_loss.masked_patch_loss_reference),
        "add_layer_norm": (layer_norm.add_layer_norm_triton, layer_norm.add_layer_norm_reference),
    }[kernel]
    torch._dynamo.reset()  # a fresh compile per case: no recompilation limit, no stale guards
    return {"triton": triton_fn, "eager": reference, "compiled": torch.compile(reference, dynamic=False)}


QUEUE_AHEAD_CYCLES = 2_000_000


class Timer:
    """CUDA-event timing of single steps with an L2 flush before each."""

    def __init__(self, warmup: int, iters: int, device: torch.device):
        self.warmup, self.iters = warmup, iters
        self.flush = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)

    def __call__(self, fn: Callable[[], None]) -> list[float]:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.iters)]
        for start, end in events:
            self.flush.zero_()
            # about 1 ms of GPU spin: the host queues the whole step (autograd and launches take a few
            # hundred microseconds of Python) before the GPU reaches the start event, so the events
            # time the GPU, not the host
            torch.cuda._sleep(QUEUE_AHEAD_CYCLES)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in events]


def summarize(times_s: list[float], nbytes: int, copy_gbps: float | None = None, flops: int = 0) -> dict:
    ordered = sorted(times_s)
    q = lambda f: ordered[round(f * (len(ordered) - 1))]  # noqa: E731
    median = statistics.median(ordered)
    result = {
        "median_ms": median * 1e3,
        "p10_ms": q(0.1) * 1e3,
        "p90_ms": q(0.9) * 1e3,
        "min_ms": ordered[0] * 1e3,
        "max_ms": ordered[-1] * 1e3,
        "gbps_on_floor": nbytes / median / 1e9,
    }
    if copy_gbps:
        result["fraction_of_copy_bandwidth"] = result["gbps_on_floor"] / copy_gbps
    if flops:
        result["tflops"] = flops / median / 1e12
    return result


def copy_bandwidth(nbytes: int, timer: Timer, device: torch.device) -> dict:
    """A device-to-device copy that reads nbytes/2 and writes nbytes/2: GB/s of total traffic."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return summarize(timer(lambda: dst.copy_(src)), 2 * (nbytes // 2))


def check_agreement(case: KernelCase, impls: dict) -> dict:
    """Max |triton - eager| over the forward outputs (a sanity check that both did the same work)."""
    outputs = {}
    for name in ("triton", "eager"):
        captured = []

        def capture(*args, _fn=impls[name]):
            out = _fn(*args)
            outs = out if isinstance(out, tuple) else (out,)
            captured.append(torch.cat([o.detach().float().flatten() for o in outs]))
            return out

        case.step(capture)
        outputs[name] = captured[0]
    diff = (outputs["triton"] - outputs["eager"]).abs().max().item()
    return {"max_abs_diff_forward": diff, "max_abs_eager_forward": outputs["eager"].abs().max().item()}


def run(args: argparse.Namespace, out: Path | None = None) -> dict:
    """Every case; with ``out``, the JSON is rewritten after each case, so a run stopped part-way
    (a time limit, a crash in one case) keeps what it measured."""
    from tqdm import tqdm

    from fastmae.bench.environment import environment_info, write_json
    from fastmae.bench.kernel_time import step_kernel_times

    device = torch.device("cuda")
    timer = Timer(args.warmup, args.iters, device)
    results = []
    report = {
        "benchmark": "kernels",
        "what": "fused kernels, forward + backward",
        "environment": environment_info(device),
        "config": {"batch": args.batch, "mask_ratio": MASK_RATIO, "decoder_dim": DECODER_DIM,
                   "warmup_steps": args.warmup, "timed_steps": args.iters, "l2_flush_mib": 512,
                   "precisions": args.modes, "compile": "torch.compile(reference, dynamic=False), inductor default"},
        "results": results,
    }
    jobs = [(k, m, mode) for mode in args.modes for m in args.models for k in args.kernels]
    bar = tqdm(jobs, desc="kernels", unit="case")
    for kernel, model, mode in bar:
        bar.set_postfix_str(f"{kernel} {model} {mode}")
        torch.manual_seed(0)
        case = CASES[kernel](MODEL_SHAPES[model], args.batch, mode == "amp", device)
        impls = implementations(kernel)
        entry = {"kernel": kernel, "model": MODEL_SHAPES[model].name, "precision": mode, "shapes": case.shapes,
                 "bytes_floor": case.bytes_floor, "floor_note": case.floor_note, "flops": case.flops}
        entry["agreement"] = check_agreement(case, impls)
        copy = copy_bandwidth(case.bytes_floor, timer, device)
        entry["copy"] = copy
        torch.cuda.synchronize()
        for name, fn in impls.items():
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                times = timer(lambda fn=fn: case.step(fn))
            except Exception as err:  # noqa: BLE001 - e.g. inductor failing on this build: record, go on
                entry[name] = {"error": f"{type(err).__name__}: {err}"}
                continue
            entry[name] = summarize(times, case.bytes_floor, copy["gbps_on_floor"], case.flops)
            entry[name]["peak_extra_memory_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            # which of the step's kernels take the time: where a slow implementation loses it
            entry[name]["kernel_time"] = step_kernel_times(lambda fn=fn: case.step(fn), device, steps=3, top=8)
        if "median_ms" in entry["triton"]:
            t = entry["triton"]["median_ms"]
            targets = {"copy_fraction_ge_0.7": entry["triton"]["fraction_of_copy_bandwidth"] >= 0.7}
            for ref in ("eager", "compiled"):
                if "median_ms" in entry[ref]:
                    entry["triton"][f"speedup_vs_{ref}"] = entry[ref]["median_ms"] / t
            if "speedup_vs_eager" in entry["triton"]:
                targets["speedup_vs_eager_ge_2"] = entry["triton"]["speedup_vs_eager"] >= 2.0
            if "speedup_vs_compiled" in entry["triton"]:
                targets["not_slower_than_compiled"] = entry["triton"]["speedup_vs_compiled"] >= 1.0
            entry["targets_met"] = targets
        results.append(entry)
        print(format_row(entry), file=sys.stderr)
        report["complete"] = len(results) == len(jobs)
        report["pending"] = [" ".join(job) for job in jobs[len(results):]]
        if out is not None:
            write_json(out, report)
    return report


def format_row(entry: dict) -> str:
    def ms(name):
        return f"{entry[name]['median_ms']:.3f}" if "median_ms" in entry.get(name, {}) else "err"

    tri = entry.get("triton", {})
    frac = tri.get("fraction_of_copy_bandwidth")
    return (f"{entry['kernel']:<18} {entry['model']:<9} {entry['precision']:<4} triton {ms('triton')} ms "
            f"eager {ms('eager')} ms compiled {ms('compiled')} ms  "
            f"{tri.get('gbps_on_floor', 0):.0f} GB/s on floor = {100 * (frac or 0):.0f}% of copy "
            f"({entry['copy']['gbps_on_floor']:.0f} GB/s)")


def plot_kernels(report: dict, path: Path) -> Path:
    """A panel per kernel: GB/s on the bytes floor of each implementation per shape, and the copy's."""
    from fastmae.bench.charts import Panel, Series, write_bar_chart

    panels = []
    for kernel in dict.fromkeys(entry["kernel"] for entry in report["results"]):
        entries = [entry for entry in report["results"] if entry["kernel"] == kernel]
        series = [Series(name, [entry[name].get("gbps_on_floor") for entry in entries], color,
                         [f"{entry[name]['gbps_on_floor']:.0f}" if "gbps_on_floor" in entry[name] else "failed"
                          for entry in entries])
                  for name, color in (("triton", "#1f77b4"), ("eager", "#7f7f7f"), ("compiled", "#ff7f0e"))]
        copy = statistics.median(entry["copy"]["gbps_on_floor"] for entry in entries)
        panels.append(Panel([f"{entry['model']}\n{entry['precision']}" for entry in entries], series,
                            f"{kernel}\nGB/s on the bytes floor", reference=copy,
                            reference_label=f"copy, {copy:.0f} GB/s"))
    config = report["config"]
    title = (f"fused kernels, forward + backward, batch {config['batch']}, on "
             f"{report['environment']['device']} (higher is faster)")
    return write_bar_chart(path, panels, title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<gpu>_<date>.json)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--kernels", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--models", nargs="+", choices=sorted(MODEL_SHAPES), default=list(MODEL_SHAPES))
    parser.add_argument("--modes", nargs="+", choices=["bf16", "amp"], default=["bf16", "amp"])
    args = parser.parse_args(argv)
    if args.batch < 1 or args.warmup < 0 or args.iters < 1:
        parser.error("--batch and --iters must be >= 1, --warmup >= 0")
    if not torch.cuda.is_available():
        print("kernels_gpu.py measures Triton kernels on a CUDA GPU; this machine has none (torch "
              f"{torch.__version__}, CUDA available: False). Run it on a GPU machine.", file=sys.stderr)
        return 2
    from fastmae.bench.environment import result_filename

    out = Path(args.out) if args.out else Path(__file__).parent / "results" / result_filename("kernels", torch.device("cuda"))
    report = run(args, out)
    print(f"wrote {out}\nwrote {plot_kernels(report, out.with_suffix('.png'))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
