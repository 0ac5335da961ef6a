"""``fastmae bench step``: training-step speed of fastmae beside the naive baseline, a reference-style
implementation and HF's ViTMAE, in one run, on the same batch size, dtype and device.

For each model: img/s, step time (median and spread), peak memory and MFU, the latter against the
spec-sheet peak and against the GEMM rate measured at the start of the run. Synthetic images already
on the device measure the model; ``--real_data`` feeds batches from ``fastmae.data`` instead.
"""

from __future__ import annotations

import argparse
import re
import dataclasses
import sys
from pathlib import Path
from typing import Callable

import torch

from fastmae.bench.charts import Panel, Series, write_bar_chart
from fastmae.bench.contenders import CONTENDER_NAMES, CUDA_GRAPH_CONTENDERS, build_contenders
from fastmae.bench.environment import (
    ResultFile,
    dtype_name,
    environment_info,
    result_filename,
    settings_tag,
)
from fastmae.bench.gemm_peak import measured_gemm_flops
from fastmae.bench.hf_vitmae import transformers_available
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
from fastmae.bench.timing import EndlessLoader, SyntheticImages, TimingPlan
from fastmae.compiling import CompileConfig
from fastmae.data.loader import LOADER_CHOICES


CPU_BATCH = 16  # on CPU the default batch is small: CI runs it


def speedups(rows: list[dict]) -> dict:
    """img/s ratios of fastmae over each other contender (eager over eager, compiled over compiled,
    CUDA-graph replays over replays), and of its compiled and replayed steps over its eager one."""
    by_name = {r["name"]: r["images_per_s"] for r in rows if "error" not in r}
    out = {}
    for ours, theirs in [("fastmae", "naive w/[M]"), ("fastmae+compile", "naive w/[M]+compile"),
                         ("fastmae+cudagraph", "naive w/[M]+cudagraph"),
                         ("fastmae", "reference-style"), ("fastmae", "hf-vitmae"),
                         ("fastmae+compile", "reference-style"), ("fastmae+compile", "hf-vitmae"),
                         ("fastmae+cudagraph", "reference-style"), ("fastmae+cudagraph", "hf-vitmae"),
                         ("fastmae+compile", "fastmae"), ("fastmae+cudagraph", "fastmae")]:
        if ours in by_name and theirs in by_name:
            out[f"{ours} / {theirs}"] = by_name[ours] / by_name[theirs]
    return out


def plot_step(result: dict, path: Path) -> Path:
    """img/s per contender, with the fraction of the measured GEMM rate it reaches (MFU)."""
    rows = result["results"]
    ips = [r.get("images_per_s") for r in rows]  # None: the contender failed
    notes = [f"{r['images_per_s']:.0f}\n{100 * r['mfu_measured_gemm']:.0f}% of GEMM" if "error" not in r else "failed"
             for r in rows]
    colors = ["#1f77b4" if r["name"].startswith("fastmae") else "#7f7f7f" if r["name"].startswith("naive")
              else "#ff7f0e" for r in rows]
    series = Series("img/s", ips, colors, notes)
    title = (f"{result['model']}: training step, batch {result['batch_size']}, {result['dtype']}, "
             f"{result['environment']['device']}")
    return write_bar_chart(path, [Panel([r["name"].replace("+", "\n+") for r in rows], [series], "images / s")], title)


def image_source(args, config, batch_size: int, device: torch.device):
    if not args.real_data:
        return SyntheticImages(batch_size, config.img_size, device), "synthetic (on device)"
    from fastmae.data.loader import DataConfig, build_loader, resolve_loader
    from fastmae.train.config import default_num_workers

    data_cfg = DataConfig(data_path=args.data_path, input_size=config.img_size, batch_size=batch_size,
                          num_workers=default_num_workers() if args.num_workers is None else args.num_workers,
                          loader=args.data_loader)
    loader = build_loader(data_cfg, rank=0, world_size=1, device=device)
    return EndlessLoader(loader), f"real ({resolve_loader(data_cfg, device)} loader, {args.data_path or 'embedded photographs'})"


class DataError(ValueError):
    """The --real_data loader could not be built (a folder without images)."""


def check_real_data_flags(args, device: torch.device) -> None:
    """The data flags, before anything is measured: a bad one would otherwise stop the run only once the
    first model's loader is built. ValueError naming the flag."""
    if not args.real_data:
        given = [flag for flag, value, default in (("--data_path", args.data_path, None),
                                                    ("--data_loader", args.data_loader, "auto"),
                                                    ("--num_workers", args.num_workers, None)) if value != default]
        if given:  # without --real_data they would be ignored, and synthetic images measured instead
            raise ValueError(f"{', '.join(given)} given without --real_data, which the benchmark would ignore "
                             "(it feeds synthetic images); add --real_data to read them")
        return
    if args.num_workers is not None and args.num_workers < 0:
        raise ValueError(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.data_path is not None and not Path(args.data_path).expanduser().exists():
        raise ValueError(f"--data_path {args.data_path} does not exist")
    if args.data_path is None and args.data_loader in ("dali", "torchvision"):
        raise ValueError(f"--data_loader {args.data_loader} reads image files: give --data_path (the embedded "
                         "photographs need --data_loader cpu or auto)")
    from fastmae.data.loader import DataConfig, resolve_loader

    resolve_loader(DataConfig(data_path=args.data_path, loader=args.data_loader), device)  # its package installed


def bench_model(args, name: str, device: torch.device, dtype: torch.dtype, batch_size: int, gemm: dict,
                names: tuple[str, ...], compiled: CompileConfig, save: Callable[[dict], object] | None = None) -> dict:
    """One model's result. ``save`` gets the result so far after every contender, marked
    ``complete: False`` until the last one, so a run stopped part-way keeps what it measured."""
    overrides = {"decoder_depth": args.decoder_depth} if args.decoder_depth is not None else {}
    config = model_config(name, **overrides)
    plan = TimingPlan(args.warmup, args.steps)
    spec_peak = spec_peak_flops(device, dtype)
    try:
        images, data = image_source(args, config, batch_size, device)
    except ValueError as err:  # what the flags' check cannot see before the loader lists the files
        raise DataError(f"--real_data: {err}") from err
    contenders = build_contenders(config, device, dtype, args.mask_ratio, names, args.kernels, args.attn, compiled)
    result = {
        "benchmark": "step",
        "model": name,
        "config": dataclasses.asdict(config),
        "batch_size": batch_size,
        "dtype": dtype_name(dtype),
        "mask_ratio": args.mask_ratio,
        "kernels": args.kernels,
        "attn": args.attn,
        "compile": dataclasses.asdict(compiled),
        "data": data,
        "warmup_steps": plan.warmup_steps,
        "timed_steps": plan.timed_steps,
        "spec_peak_flops_per_s": spec_peak,
        "measured_gemm": gemm,
    }

    def so_far(measured: dict) -> dict:
        rows = [measured[c.name] for c in contenders if c.name in measured]
        pending = [c.name for c in contenders if c.name not in measured]
        return {**result, "results": rows, "speedups": speedups(rows), "complete": not pending, "pending": pending}

    # The eager naive baseline (every token through the encoder) needs the most memory: measured first,
    # so that running out of memory (--oom_fallback) happens before any torch.compile is spent.
    measured = {}
    for contender in sorted(contenders, key=lambda c: c.name != "naive w/[M]"):
        try:
            measured[contender.name] = measure_contender(contender, images, plan, device, batch_size, spec_peak,
                                                         gemm["flops_per_s"], progress=not args.no_progress)
        except BatchTooLarge:
            raise
        except Exception as err:  # noqa: BLE001 - one contender failing (an HF version, a compiler error) is
            # recorded; the others are still measured and written
            measured[contender.name] = {"name": contender.name, "description": contender.description,
                                        "error": f"{type(err).__name__}: {err}"}
            print(f"  {contender.name:<20} failed: {measured[contender.name]['error']}", flush=True)
        else:
            print(format_row(measured[contender.name]), flush=True)
        if save is not None:
            save(so_far(measured))
    return so_far(measured)


def default_contenders(device: torch.device, compile_choice: str, hf: bool) -> tuple[str, ...]:
    compile_on = compile_choice == "on" or (compile_choice == "auto" and device.type == "cuda")
    names = ["fastmae", "naive w/[M]", "reference-style"]
    if compile_on:
        names += ["fastmae+compile", "naive w/[M]+compile"]
    if device.type == "cuda":
        names += list(CUDA_GRAPH_CONTENDERS)
    if hf and transformers_available():
        names.append("hf-vitmae")
    return tuple(n for n in CONTENDER_NAMES if n in names)


def contenders_tag(names: tuple[str, ...], default: tuple[str, ...]) -> str:
    """The file-name part of a run that measured other contenders than the default ones: "" for those,
    "_nohf" without HF's, else "_impl-" and each contender's name ("naive w/[M]+compile" -> naive-w-M-compile)."""
    if names == default:
        return ""
    if names == tuple(n for n in default if n != "hf-vitmae"):
        return "_nohf"
    slugs = ("-".join(re.findall(r"[A-Za-z0-9]+", name)) for name in names)
    return "_impl-" + "_".join(slugs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="architecture(s), comma separated (default: mae_vit_base_patch16 on CUDA, "
                             "mae_vit_demo_patch8 on CPU)")
    parser.add_argument("--decoder_depth", type=int, default=None, help="override the decoder depth")
    add_measurement_arguments(parser, cpu_batch=CPU_BATCH)
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"], nargs="?", const="on",
                        help="also measure the torch.compile'd engine (auto: on CUDA only, compiling being slow on a "
                             "CPU; --compile alone: on, as the other commands' switch)")
    add_compile_arguments(parser, "the +compile rows")
    parser.add_argument("--impl", default=None,
                        help=f"comma-separated subset of {','.join(CONTENDER_NAMES)} (default: all available)")
    parser.add_argument("--no_hf", action="store_true", help="leave out HF transformers' ViTMAE")
    parser.add_argument("--gemm_size", type=int, default=None, help="matrix size of the GEMM-rate measurement")
    parser.add_argument("--real_data", action="store_true", help="feed batches from the data loader")
    parser.add_argument("--data_path", default=None, help="image folder for --real_data (default: embedded photos)")
    parser.add_argument("--data_loader", default="auto", choices=LOADER_CHOICES, help="the loader of --real_data")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="loader workers for --real_data (default: as pretrain, at most 10 and this machine's cores less one)")
    parser.add_argument("--json", default=None, help="write the result here (one model), and its chart beside it (.png)")
    parser.add_argument("--out_dir", default=None,
                        help="write step_<model>_<settings>_<gpu>_<date>.json and .png here, one per model; a name "
                             "already taken gets _2, _3, ... (an earlier result is never replaced)")


def run(args) -> int:
    try:
        device, dtype, batch_size, _ = resolve_measurement(args, cpu_batch=CPU_BATCH)
        cuda = device.type == "cuda"
        models = (args.model or ("mae_vit_base_patch16" if cuda else "mae_vit_demo_patch8")).split(",")
        check_model_names(models, args.mask_ratio)
        compiled = compile_config(args)
        check_real_data_flags(args, device)
        if args.gemm_size is not None and args.gemm_size < 1:
            raise ValueError(f"--gemm_size must be positive, got {args.gemm_size}")
        if args.decoder_depth is not None and args.decoder_depth < 0:
            raise ValueError(f"--decoder_depth must be >= 0, got {args.decoder_depth}")
        if args.json and len(models) > 1:
            raise ValueError("--json takes one model; use --out_dir for several")
        if args.impl:
            names = tuple(n.strip() for n in args.impl.split(","))
            unknown = [n for n in names if n not in CONTENDER_NAMES]
            if unknown:
                raise ValueError(f"unknown implementations {unknown}; choose from {list(CONTENDER_NAMES)}")
            if not cuda and any(n in CUDA_GRAPH_CONTENDERS for n in names):
                raise ValueError(f"{', '.join(CUDA_GRAPH_CONTENDERS)} replay CUDA graphs: they need a CUDA device")
            if "hf-vitmae" in names and not transformers_available():
                raise ValueError("hf-vitmae asked for, but transformers is not installed (pip install transformers)")
        else:
            names = default_contenders(device, args.compile, not args.no_hf)
        # another batch than the default is another result: a file of its own beside the default's
        batch_tag = "" if batch_size == default_batch_size(device, CPU_BATCH) else f"_batch{batch_size}"
        settings = (f"{compiled.tag}{engine_tag(args.kernels, args.attn)}{batch_tag}"
                    + contenders_tag(names, default_contenders(device, args.compile, True))
                    + settings_tag(device, decoder_depth=args.decoder_depth, mask_ratio=args.mask_ratio, dtype=dtype,
                                   real_data=args.real_data))
        outputs = {name: ResultFile(args.json, args.out_dir, result_filename(f"step_{name}{settings}", device))
                   for name in models}
    except ValueError as err:
        print(f"fastmae bench step: error: {err}", file=sys.stderr)
        return 2

    environment = environment_info(device)
    print(f"device: {environment['device']}  torch {environment['torch']}  dtype {dtype_name(dtype)}", flush=True)
    measuring = None  # the model being measured
    try:
        gemm = measured_gemm_flops(device, dtype, args.gemm_size)
        print(f"measured {gemm['dtype']} GEMM ({gemm['size']}^3, fastest as {gemm['layout']}): "
              f"{gemm['flops_per_s'] / 1e12:.3g} TFLOP/s", flush=True)
        status = 0
        for name in models:
            measuring = name
            status = max(status, measure_model(args, name, device, dtype, batch_size, gemm, names, compiled,
                                               environment, outputs[name]))
        return status
    except DataError as err:  # every model reads the same data: the run ends here
        print(f"fastmae bench step: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        output = outputs.get(measuring)
        if measuring is None:
            print("fastmae bench step: stopped before any model was measured; nothing written", file=sys.stderr)
        elif output is None or output.written is None:
            print(f"fastmae bench step: stopped while measuring {measuring}; nothing of it written", file=sys.stderr)
        else:
            print(f"fastmae bench step: stopped while measuring {measuring}; what it measured is in {output.path} "
                  f"(complete: {str(output.written['complete']).lower()})", file=sys.stderr)
            if output.written["results"]:
                print(f"  wrote {plot_step(output.written, output.chart)}")
        return 130


def measure_model(args, name: str, device: torch.device, dtype: torch.dtype, batch_size: int, gemm: dict,
                  names: tuple[str, ...], compiled: CompileConfig, environment: dict, output: ResultFile) -> int:
    """One model's result, written and reported; the exit status it calls for."""
    save = (lambda partial: output.write({"environment": environment, **partial})) if output else None
    batch = batch_size
    while True:
        print(f"{name}: batch {batch}, {', '.join(names)}", flush=True)
        try:
            result = bench_model(args, name, device, dtype, batch, gemm, names, compiled, save)
            break
        except BatchTooLarge as err:
            if not args.oom_fallback or batch == 1:
                print(f"fastmae bench step: error: {err} (try --oom_fallback or a smaller --batch_size)", file=sys.stderr)
                return 1
            print(f"  {err}; retrying every contender at batch {batch // 2}", flush=True)
            batch //= 2
    result = {"environment": environment, **result}
    status = 0
    failed = [r["name"] for r in result["results"] if "error" in r]
    if failed:
        print(f"fastmae bench step: error: {name}: {', '.join(failed)} failed (recorded in the results)",
              file=sys.stderr)
        status = 1
    for key, value in result["speedups"].items():
        print(f"  speedup {key}: {value:.2f}x")
    if output:  # the JSON is complete since the last contender's save
        print(f"  wrote {output.path}")
        print(f"  wrote {plot_step(result, output.chart)}")
    return status
