"""``fastmae bench data``: images per second of each available data loader, decode only and decode +
augmentation, on a folder of JPEGs or on a generated ImageNet-like set (about 500x375, quality 90).

Each measurement runs the loader as the trainer does (the same ``build_loader`` configuration,
batches delivered on the training device), drops the first ``--warmup`` batches (worker start-up,
decoder initialisation) and synchronises the GPU before reading the clock.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fastmae.bench.charts import Panel, Series, write_bar_chart
from fastmae.bench.environment import device_name, environment_info, write_json
from fastmae.device import device_from_flag
from fastmae.data.loader import CPULoader, DataConfig
from fastmae.data.sources import ImageSource, open_source
from fastmae.data.synthetic import IMAGENET_LIKE_QUALITY, IMAGENET_LIKE_SIZE, write_jpeg_folder

LOADERS = ("cpu", "hybrid", "dali", "torchvision")
WORKER_LOADERS = ("cpu", "hybrid")  # a batch per worker process at a time
# Enough batches for a steady rate, few enough that a large --data_path is not decoded whole each time.
DEFAULT_TIMED_BATCHES = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_path", default=None, help="folder of images or .tar shards (default: a generated ImageNet-like set)")
    parser.add_argument("--num_images", type=int, default=None,
                        help="images to generate when no --data_path is given (default: at least 512, and enough "
                             "for the warm-up and two rounds of every CPU worker)")
    parser.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS),
                        help="loaders to measure (those not installed or without their device are skipped)")
    parser.add_argument("--modes", nargs="+", choices=("decode", "augment"), default=["decode", "augment"],
                        help="decode: decode only; augment: decode + RandomResizedCrop + flip + normalise")
    parser.add_argument("--num_threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads / worker processes each loader may use (default: all cores)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per batch")
    parser.add_argument("--input_size", type=int, default=224, help="crop size")
    parser.add_argument("--batches", type=int, default=DEFAULT_TIMED_BATCHES,
                        help=f"timed batches per measurement (default: {DEFAULT_TIMED_BATCHES}; 0: one whole epoch, "
                             "which on ImageNet decodes 1.28M images per loader and mode)")
    parser.add_argument("--warmup", type=int, default=2, help="batches run before the clock starts")
    parser.add_argument("--hw_decoder_load", type=float, nargs="+", default=None,
                        help="DALI on a GPU: hardware decoder shares to sweep (default: the loader's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the batches are delivered (cuda when there is one)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default=None, help="draw the img/s as a bar chart PNG here (needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ValueError as err:
        print(f"fastmae bench data: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before any loader was measured (those stops are reported by _run)
        print("fastmae bench data: stopped before any loader was measured; nothing written", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    device = device_from_flag(args.device)
    if args.num_images is None:
        # the CPU loaders' workers make whole batches at once: time whole rounds of them (see measure)
        rounds_needed = warmup_batches(args.warmup, args.num_threads) + 1 + 2 * args.num_threads
        args.num_images = max(512, args.batch_size * rounds_needed)
    if args.batch_size <= 0 or args.num_threads <= 0 or args.num_images <= 0:
        raise ValueError("--batch_size, --num_threads and --num_images must be positive")
    if args.batches < 0 or args.warmup < 0:
        raise ValueError(f"--batches and --warmup must be >= 0 (--batches 0: one epoch), got --batches {args.batches} "
                         f"--warmup {args.warmup}")
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise ValueError(f"--plot {args.plot}: the chart is a PNG; name it .png")
    if args.plot and args.json and Path(args.plot).resolve() == Path(args.json).resolve():
        raise ValueError(f"--plot and --json name the same file {args.json}: the chart would replace the results")
    with tempfile.TemporaryDirectory(prefix="fastmae-bench-data-") as scratch:
        data_path = args.data_path
        if data_path is None:
            print(f"generating {args.num_images} ImageNet-like JPEGs ({IMAGENET_LIKE_SIZE[0]}x{IMAGENET_LIKE_SIZE[1]}, "
                  f"quality {IMAGENET_LIKE_QUALITY}) in {scratch}")
            write_jpeg_folder(scratch, args.num_images, num_classes=10)
            data_path = scratch
        source = open_source(data_path)
        cfg = DataConfig(data_path=str(data_path), input_size=args.input_size, batch_size=args.batch_size,
                         num_workers=args.num_threads, seed=0, pin_mem=device.type == "cuda")
        results = []
        report = {"benchmark": "data", "environment": environment(device), "num_threads": args.num_threads,
                  "data_path": args.data_path or f"generated: {args.num_images} x ~{IMAGENET_LIKE_SIZE} q{IMAGENET_LIKE_QUALITY}",
                  "num_images": len(source), "batch_size": args.batch_size, "input_size": args.input_size,
                  "warmup_batches": args.warmup, "timed_batches_asked": args.batches, "results": results,
                  "complete": False, "pending": [], "skipped_loaders": {}}
        try:
            measure_loaders(args, device, cfg, source, report)
        except KeyboardInterrupt:
            print_table(results, args.num_threads, device)
            where = (f"the measurements made are in {args.json} (complete: false)" if args.json and results
                     else "nothing written")
            print(f"fastmae bench data: stopped; {where}", file=sys.stderr)
            if args.plot and results:
                plot(results, args.num_threads, device, args.plot)
                print(f"wrote {args.plot}")
            return 130
    print_table(results, args.num_threads, device)
    if not results:
        print(f"fastmae bench data: error: no loader could be measured here ({report['skipped_loaders']}); "
              "nothing written", file=sys.stderr)
        return 2
    short = [r for r in results if args.batches and r.get("timed_batches", args.batches) < args.batches]
    if short:  # a small folder: the rate rests on fewer batches than asked
        print(f"note: {short[0]['timed_batches']} batch(es) timed per loader, not the {args.batches} asked: the data "
              f"holds {len(source)} images (give more, or a smaller --batch_size)")
    if args.json:
        report["complete"] = True
        print(f"wrote {write_json(args.json, report)}")
    if args.plot:
        plot(results, args.num_threads, device, args.plot)
        print(f"wrote {args.plot}")
    return 0


def measure_loaders(args: argparse.Namespace, device: torch.device, cfg: DataConfig, source: ImageSource,
                    report: dict) -> None:
    """Every loader and mode asked for, each measurement added to report["results"] (and written to
    --json) as it is made: a run stopped part-way keeps what it measured, and lists in "pending" what it
    did not measure."""
    planned = []
    for loader_name in args.loaders:
        why_not = unavailable(loader_name, device)
        if why_not:
            print(f"{loader_name}: skipped ({why_not})")
            report["skipped_loaders"][loader_name] = why_not
            continue
        for mode in args.modes:
            if loader_name == "hybrid" and mode == "decode":
                continue  # its workers decode as the cpu loader's do: the same measurement
            loads = args.hw_decoder_load if loader_name == "dali" and device.type == "cuda" and args.hw_decoder_load else [None]
            planned += [(loader_name, mode, hw_load) for hw_load in loads]
    report["pending"] = [_label(*case) for case in planned]
    for loader_name, mode, hw_load in planned:
        loader = make_loader(loader_name, mode, cfg, device, source, args.num_threads, hw_load)
        label = _label(loader_name, mode, hw_load)
        # the CPU loaders' worker processes each make a whole batch: num_threads at once
        parallel = max(1, args.num_threads) if loader_name in WORKER_LOADERS else 1
        report["results"].append({"loader": loader_name, "mode": mode, "hw_decoder_load": hw_load,
                                  **measure(loader, label, device, args.warmup, args.batches, args.batch_size, parallel)})
        report["pending"].remove(label)
        if args.json:
            write_json(args.json, report)


def _label(loader_name: str, mode: str, hw_load: float | None) -> str:
    return f"{loader_name} {mode}" + (f" hw_decoder_load={hw_load}" if hw_load is not None else "")


def unavailable(loader_name: str, device: torch.device) -> str | None:
    if loader_name == "dali" and importlib.util.find_spec("nvidia.dali") is None:
        return "nvidia-dali is not installed"
    if loader_name == "torchvision":
        if device.type != "cuda":
            return "decodes on a CUDA device only"
        if importlib.util.find_spec("torchvision") is None:
            return "torchvision is not installed"
    return None


class _DecodedSizes(Dataset):
    """Decode only, with PIL: item -> its decoded size [height, width] (the pixels are dropped after
    decoding), [-1, -1] for an unreadable file."""

    def __init__(self, source: ImageSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            image = self.source.load(index)
        except Exception:  # counted by _CPUDecodeOnly, as the loaders count theirs
            return torch.tensor([-1, -1])
        return torch.tensor([image.height, image.width])


class _CPUDecodeOnly:
    def __init__(self, source: ImageSource, cfg: DataConfig):
        self.loader = DataLoader(_DecodedSizes(source), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                 shuffle=True, drop_last=True, persistent_workers=cfg.num_workers > 0)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for sizes in self.loader:  # [B, 2]
            self.skipped += int((sizes[:, 0] < 0).sum())
            yield sizes


def make_loader(name: str, mode: str, cfg: DataConfig, device: torch.device, source: ImageSource,
                num_threads: int, hw_decoder_load: float | None):
    decode_only = mode == "decode"
    if name == "cpu":
        return _CPUDecodeOnly(source, cfg) if decode_only else CPULoader(cfg, 0, 1, device)
    if name == "hybrid":
        from fastmae.data.hybrid import HybridLoader

        return HybridLoader(cfg, 0, 1, device)
    if name == "dali":
        from fastmae.data.dali import DEFAULT_HW_DECODER_LOAD, build_dali_loader

        return build_dali_loader(cfg, 0, 1, device, num_threads=num_threads, decode_only=decode_only,
                                 hw_decoder_load=DEFAULT_HW_DECODER_LOAD if hw_decoder_load is None else hw_decoder_load)
    from fastmae.data.gpu_decode import build_torchvision_loader

    return build_torchvision_loader(cfg, 0, 1, device, num_io_threads=num_threads, decode_only=decode_only)


def warmup_batches(warmup: int, parallel: int) -> int:
    """The warm-up, rounded up to whole rounds of ``parallel`` workers (at least one round)."""
    return max(1, -(-max(warmup, 1) // parallel)) * parallel if parallel > 1 else warmup


def measure(loader, label: str, device: torch.device, warmup: int, batches: int, batch_size: int,
            parallel: int = 1) -> dict:
    """Run one pass (up to warmup + batches batches) and time the batches after the warm-up.

    ``parallel``: batches the loader makes at the same time (worker processes that each make a whole
    batch). Such a loader delivers its batches in bursts of ``parallel``: the warm-up and the timed
    span are whole rounds, or the batches made during the warm-up would be counted as made in no time.
    """
    warmup = warmup_batches(warmup, parallel)
    # the batch at index == warmup only starts the clock: --batches N needs warmup + 1 + N batches
    total = len(loader) if batches <= 0 else min(len(loader), warmup + 1 + batches)
    if parallel > 1:  # whole rounds after the batch that starts the clock
        total = warmup + 1 + max(0, total - warmup - 1) // parallel * parallel
    if total <= warmup or (parallel > 1 and total == warmup + 1):
        raise ValueError(f"{label}: {len(loader)} batches per epoch leave none to time after {warmup} warm-up "
                         f"batches{f' (whole rounds of {parallel} workers are timed)' if parallel > 1 else ''}; give more "
                         f"images{' or --batches' if parallel > 1 else ''} or a smaller --batch_size")
    timed_images, start, seconds = 0, None, None
    bar = tqdm(total=total, desc=label, unit="batch", leave=False)
    for index, images in enumerate(loader):
        if index == warmup:
            synchronize(device)
            start = time.perf_counter()
        elif index > warmup:
            timed_images += batch_size
        bar.update(1)
        if start is not None and index > warmup:
            bar.set_postfix(img_s=f"{timed_images / (time.perf_counter() - start):.0f}")
        if index + 1 >= total:
            # stop the clock here: leaving the loop stops the loader's read-ahead threads, not timed
            synchronize(device)
            seconds = time.perf_counter() - start
            break
    if seconds is None:
        synchronize(device)
        seconds = time.perf_counter() - start
    bar.close()
    # the batch taken at index == warmup started the clock: its images are not counted
    return {"warmup_batches": warmup, "timed_batches": total - warmup - 1, "images": timed_images, "seconds": seconds,
            "img_per_s": timed_images / seconds if seconds > 0 else float("nan"),
            "skipped_files": getattr(loader, "skipped", 0)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_table(results: list[dict], num_threads: int, device: torch.device) -> None:
    print(f"\ndata loaders on {device_name(device)} with {num_threads} CPU thread(s):")
    print(f"{'loader':<12} {'mode':<8} {'hw load':>8} {'images':>8} {'seconds':>9} {'img/s':>9}")
    for row in results:
        hw = "" if row["hw_decoder_load"] is None else f"{row['hw_decoder_load']:.2f}"
        print(f"{row['loader']:<12} {row['mode']:<8} {hw:>8} {row['images']:>8} {row['seconds']:>9.2f} {row['img_per_s']:>9.1f}")


def plot(results: list[dict], num_threads: int, device: torch.device, path: str) -> None:
    """img/s per loader (a group per loader and hardware-decoder share), a bar per mode."""
    def group(row):
        return row["loader"] + (f"\nhw {row['hw_decoder_load']:.2f}" if row["hw_decoder_load"] is not None else "")

    groups = list(dict.fromkeys(group(row) for row in results))
    rate = {(group(row), row["mode"]): row["img_per_s"] for row in results}
    series = [Series(mode, [rate.get((g, mode)) for g in groups], "#4c72b0" if mode == "decode" else "#dd8452")
              for mode in dict.fromkeys(row["mode"] for row in results)]
    write_bar_chart(path, [Panel(groups, series, "images / s")],
                    f"data loaders on {device_name(device)}, {num_threads} CPU thread(s)")


def environment(device: torch.device) -> dict:
    """The benchmarks' common record (device, versions, git commit) and the decoders' versions."""
    info = environment_info(device)
    for package, module in (("nvidia-dali", "nvidia.dali"), ("torchvision", "torchvision")):
        if importlib.util.find_spec(module) is not None:
            info[package] = __import__(module, fromlist=["__version__"]).__version__
    return info
