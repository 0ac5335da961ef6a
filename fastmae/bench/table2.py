"""``fastmae bench table2``: the paper's Table 2 on this device.

Table 2 of He et al. (2022) gives the wall-clock speed-up of dropping mask tokens from the encoder
(128 TPU-v3 cores): relative to ViT-L with mask tokens in the encoder and an 8-block decoder,
ViT-L without mask tokens is 2.8x faster with an 8-block decoder and 3.7x with a 1-block one;
ViT-H 3.5x and 4.1x. Every row here is the same engine (fastmae), same batch, same dtype; beside the
measured speed-up stand the paper's and the FLOP-count limit (the ratio of training FLOPs).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastmae.bench.charts import Panel, Series, write_bar_chart
from fastmae.bench.contenders import Contender, fastmae_step
from fastmae.bench.environment import ResultFile, dtype_name, environment_info, result_filename, settings_tag
from fastmae.bench.gemm_peak import measured_gemm_flops
from fastmae.bench.measure import (
    BatchTooLarge,
    add_compile_arguments,
    add_measurement_arguments,
    check_model_names,
    compile_config,
    default_batch_size,
    engine_tag,
    format_row,
    measure_contender,
    model_config,
    resolve_measurement,
    spec_peak_flops,
)
from fastmae.bench.timing import SyntheticImages, TimingPlan
from fastmae.compiling import CompileConfig
from fastmae.flops import train_flops_per_image


@dataclass(frozen=True)
class Table2Row:
    encoder: str
    decoder_depth: int
    encoder_mask_tokens: bool
    paper_speedup: float | None  # relative to the encoder's "w/ [M]", 8-block row

    @property
    def label(self) -> str:
        return f"{self.encoder}{' w/ [M]' if self.encoder_mask_tokens else ''}, decoder depth {self.decoder_depth}"


PAPER_SPEEDUPS = {  # (encoder, decoder depth) -> the paper's wall-clock speed-up without mask tokens
    ("mae_vit_large_patch16", 8): 2.8,
    ("mae_vit_large_patch16", 1): 3.7,
    ("mae_vit_huge_patch14", 8): 3.5,
    ("mae_vit_huge_patch14", 1): 4.1,
}
PAPER_ENCODERS = ("mae_vit_large_patch16", "mae_vit_huge_patch14")
# Small stand-ins so that CPU runs and CI exercise the same code: 64 patches, a few blocks.
SMALL_ENCODERS = ("mae_vit_micro_patch4", "mae_vit_demo_patch8")


def table2_rows(encoders: tuple[str, ...]) -> list[Table2Row]:
    """Per encoder: the baseline (w/ [M], 8 blocks), then without mask tokens with 8 and 1 blocks."""
    rows = []
    for encoder in encoders:
        rows.append(Table2Row(encoder, 8, True, 1.0 if encoder in PAPER_ENCODERS else None))
        for depth in (8, 1):
            rows.append(Table2Row(encoder, depth, False, PAPER_SPEEDUPS.get((encoder, depth))))
    return rows


def _measure_encoder(rows: list[Table2Row], args, device, dtype, batch_size, gemm, spec_peak,
                     compiled: CompileConfig | None, save: Callable[[list[dict]], object] = lambda rows: None,
                     cuda_graph: bool = False) -> list[dict]:
    """The encoder's rows; ``save`` gets them after each one."""
    plan = TimingPlan(args.warmup, args.steps)
    results = []
    baseline = None
    for row in rows:
        config = model_config(row.encoder, decoder_depth=row.decoder_depth)
        flops = train_flops_per_image(config, args.mask_ratio, row.encoder_mask_tokens)
        contender = Contender(
            row.label, "fastmae engine" + (f", {compiled.describe()}" if compiled else "")
            + (", the step replayed as a CUDA graph" if cuda_graph else ""),
            dtype_name(dtype), flops,
            lambda config=config, row=row: fastmae_step(config, device, dtype, args.mask_ratio, row.encoder_mask_tokens,
                                                        compiled, args.kernels, args.attn, cuda_graph))
        images = SyntheticImages(batch_size, config.img_size, device)
        measured = measure_contender(contender, images, plan, device, batch_size, spec_peak, gemm["flops_per_s"],
                                     progress=not args.no_progress)
        print(format_row(measured), flush=True)
        result = {**dataclasses.asdict(row), "label": row.label, "config": dataclasses.asdict(config),
                  "batch_size": batch_size, **measured}  # the encoder's batch: halved after running out of memory
        if baseline is None:
            baseline = result
        result["measured_speedup"] = baseline["mean_s"] / result["mean_s"]  # sustained img/s over the baseline's
        result["flop_limit_speedup"] = baseline["train_flops_per_image"] / result["train_flops_per_image"]
        if result["measured_speedup"] > 1.2 * result["flop_limit_speedup"]:  # fewer FLOPs cannot buy more than this
            beyond = (f"measured {result['measured_speedup']:.2f}x beyond the FLOP-count limit "
                      f"{result['flop_limit_speedup']:.2f}x: the baseline's timing was slowed by other work, rerun")
            result["warning"] = "; ".join(filter(None, [result.get("warning"), beyond]))
            print(f"    warning: {beyond}", flush=True)
        results.append(result)
        save(results)
    return results


def plot_table2(rows: list[dict], path: Path, title: str) -> Path:
    shown = [r for r in rows if not r["encoder_mask_tokens"]]
    labels = [f"{r['encoder'].removeprefix('mae_vit_')}\ndecoder {r['decoder_depth']}" for r in shown]
    series = [Series(name, [r[key] for r in shown], color)
              for name, key, color in [("measured here", "measured_speedup", "#1f77b4"),
                                       ("paper (128 TPU-v3)", "paper_speedup", "#ff7f0e"),
                                       ("FLOP-count limit", "flop_limit_speedup", "#7f7f7f")]]
    panel = Panel(labels, series, "speed-up over encoder w/ [M], 8-block decoder", value_format="{:.1f}x", reference=1.0)
    return write_bar_chart(path, [panel], title)


def print_table(rows: list[dict]) -> None:
    print(f"{'row':<52} {'batch':>6} {'step ms':>9} {'img/s':>9} {'measured':>9} {'paper':>7} {'FLOP limit':>10}")
    for r in rows:
        paper = f"{r['paper_speedup']:.1f}x" if r["paper_speedup"] is not None else "-"
        print(f"{r['label']:<52} {r['batch_size']:>6} {1e3 * r['median_s']:9.2f} {r['images_per_s']:9.1f} "
              f"{r['measured_speedup']:8.2f}x {paper:>7} {r['flop_limit_speedup']:9.2f}x")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=None,
                        help=f"encoders, comma separated (default: {','.join(PAPER_ENCODERS)}; "
                             f"with --small: {','.join(SMALL_ENCODERS)})")
    parser.add_argument("--small", action="store_true", help="small encoders that run on CPU (CI)")
    # ViT-H at the default batch 256 does not fit an 80 GB GPU: its rows are measured at 128 by default
    add_measurement_arguments(parser, cpu_batch=32, oom_fallback=True)
    parser.add_argument("--compile", action="store_true", help="run every row under torch.compile")
    add_compile_arguments(parser, "--compile")
    parser.add_argument("--cuda_graph", action="store_true",
                        help="replay every row's eager step as one CUDA graph (CUDA only; not with --compile)")
    parser.add_argument("--json", default=None, help="write the result here (the PNG goes beside it)")
    parser.add_argument("--out_dir", default=None,
                        help="write table2_<settings>_<gpu>_<date>.json and .png here; a name already taken gets "
                             "_2, _3, ... (an earlier result is never replaced)")


def run(args) -> int:
    try:
        device, dtype, batch_size, plan = resolve_measurement(args, cpu_batch=32)
        encoders = tuple((args.models or ",".join(SMALL_ENCODERS if args.small else PAPER_ENCODERS)).split(","))
        check_model_names(encoders, args.mask_ratio)
        compiled = compile_config(args) if args.compile else None
        if args.cuda_graph and (compiled or device.type != "cuda"):
            raise ValueError("--cuda_graph replays the eager step as a CUDA graph: it needs a CUDA device, and "
                             "not --compile (whose mode reduce-overhead is torch.compile's own CUDA graphs)")
        what = ("table2" + ((compiled.tag or "_compile") if compiled else "") + ("_cudagraph" if args.cuda_graph else "")
                + engine_tag(args.kernels, args.attn)
                + ("" if batch_size == default_batch_size(device, 32) else f"_batch{batch_size}")
                + settings_tag(device, mask_ratio=args.mask_ratio, dtype=dtype)
                + ("_small" if args.small and not args.models else ""))
        output = ResultFile(args.json, args.out_dir, result_filename(what, device))
    except ValueError as err:
        print(f"fastmae bench table2: error: {err}", file=sys.stderr)
        return 2

    environment = environment_info(device)
    print(f"device: {environment['device']}  torch {environment['torch']}  dtype {dtype_name(dtype)}", flush=True)
    try:
        gemm = measured_gemm_flops(device, dtype)
    except KeyboardInterrupt:
        print("fastmae bench table2: stopped before any row was measured; nothing written", file=sys.stderr)
        return 130
    spec_peak = spec_peak_flops(device, dtype)
    planned = [row.label for row in table2_rows(encoders)]
    result = {
        "environment": environment,
        "benchmark": "table2",
        "dtype": dtype_name(dtype),
        "mask_ratio": args.mask_ratio,
        "compile": dataclasses.asdict(compiled) if compiled else None,
        "cuda_graph": args.cuda_graph,
        "kernels": args.kernels,
        "attn": args.attn,
        "data": "synthetic (on device)",
        "warmup_steps": plan.warmup_steps,
        "timed_steps": plan.timed_steps,
        "batch_size_requested": batch_size,
        "oom_fallback": args.oom_fallback,
        "spec_peak_flops_per_s": spec_peak,
        "measured_gemm": gemm,
        "paper": "He et al. 2022, Table 2: wall-clock speed-up on 128 TPU-v3 cores, relative to w/ [M] with 8 blocks",
    }
    rows: list[dict] = []
    errors: list[dict] = []  # an encoder's first failing row; its later rows are not measured

    def save(rows: list[dict]) -> None:  # after every row: a run stopped part-way keeps what it measured
        if output:
            done = {row["label"] for row in rows}
            pending = [label for label in planned if label not in done]
            output.write({**result, "rows": rows, "errors": errors, "complete": not pending, "pending": pending})

    def finish() -> None:
        """The table and the chart of the rows measured, whether or not every row was."""
        print_table(rows)
        if output and output.path and any(not row["encoder_mask_tokens"] for row in rows):
            png = plot_table2(rows, output.chart, f"Table 2 on {environment['device']}, {dtype_name(dtype)}")
            print(f"wrote {output.path} and {png}")
        elif output and output.path:
            print(f"wrote {output.path} (no chart: no row without mask tokens was measured)")

    encoder_rows: list[dict] = []  # the rows of the encoder being measured, as it goes
    try:
        for encoder in encoders:
            batch = batch_size
            while True:
                encoder_rows = []

                def save_encoder(measured: list[dict], done=list(rows)) -> None:
                    encoder_rows[:] = measured
                    save(done + measured)

                try:
                    _measure_encoder(table2_rows((encoder,)), args, device, dtype, batch, gemm, spec_peak, compiled,
                                     save_encoder, args.cuda_graph)
                    break
                except BatchTooLarge as err:
                    if args.oom_fallback and batch > 1:
                        print(f"  {err}; measuring {encoder}'s rows again at batch {batch // 2}", flush=True)
                        batch //= 2
                        continue
                    hint = "a smaller --batch_size" + ("" if args.oom_fallback else ", or leave out --no_oom_fallback")
                    failure = f"{err} (try {hint})"
                except OSError:  # writing the result (a full disk): the command's error, not a row's
                    raise
                except Exception as err:  # noqa: BLE001 - one encoder failing (a compiler error, a kernel) is
                    # reported and recorded; the rows measured so far and the other encoders are kept
                    failure = f"{type(err).__name__}: {err}"
                done = {row["label"] for row in encoder_rows}
                row = next((r.label for r in table2_rows((encoder,)) if r.label not in done), encoder)
                errors.append({"encoder": encoder, "row": row, "batch_size": batch, "error": failure})
                print(f"  {row} failed: {failure}", flush=True)
                break
            rows, encoder_rows = rows + encoder_rows, []
            save(rows)
    except KeyboardInterrupt:
        rows += encoder_rows
        finish()
        where = f"the rows measured are in {output.path} (complete: false)" if output.path else "nothing written"
        print(f"fastmae bench table2: stopped; {where}", file=sys.stderr)
        return 130
    finish()
    for error in errors:
        print(f"fastmae bench table2: error: {error['row']}: {error['error']}", file=sys.stderr)
    return 1 if errors else 0
