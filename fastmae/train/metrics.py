"""What a run reports: a tqdm bar (loss, lr, img/s), ``metrics.jsonl`` (one JSON object per logging
step), the reference's ``log.txt`` (one JSON object per epoch), TensorBoard scalars when the ``tensorboard`` package is installed, and the run's totals
(img/s, the share of time spent waiting for data) at the end. Only rank 0 reports."""

from __future__ import annotations

import json
import math
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from fastmae.atomic_file import atomic_write, set_aside


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this run: allocated GPU memory on CUDA, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kilobytes / 2**20


def open_tensorboard(log_dir: str | Path):
    """A TensorBoard SummaryWriter on ``log_dir``, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(log_dir))


def no_tensorboard_message(log_dir: str | Path, metrics_path: str | Path | None) -> str:
    """What a run given --log_dir says when tensorboard is not installed (the flag is not silently ignored)."""
    where = f"the metrics are in {metrics_path}" if metrics_path is not None else "the metrics are only printed"
    return (f"--log_dir {log_dir}: no TensorBoard logs, tensorboard is not installed (pip install "
            f"'fastmae[tensorboard]'); {where}")


@dataclass
class Span:
    """Logging windows added up: wall time, time waiting for the next batch, images (all ranks), steps."""

    seconds: float = 0.0
    data_wait_s: float = 0.0
    images: int = 0
    steps: int = 0

    def add(self, seconds: float, data_wait_s: float, images: int, steps: int) -> None:
        self.seconds += seconds
        self.data_wait_s += data_wait_s
        self.images += images
        self.steps += steps

    def summary(self) -> dict:
        measured = self.seconds > 0
        return {"steps": self.steps, "images": self.images, "seconds": self.seconds,
                "img_per_s": self.images / self.seconds if measured else None,
                "data_wait_fraction": self.data_wait_s / self.seconds if measured else None}


@dataclass
class RunTotals:
    """The whole run, and the run after its first logging window: the first window holds the start-up
    (loader workers starting, cuDNN/cuBLAS set-up, Triton autotuning), which a long run amortises."""

    whole: Span = field(default_factory=Span)
    after_first_window: Span = field(default_factory=Span)
    windows: int = 0

    def add_window(self, seconds: float, data_wait_s: float, images: int, steps: int) -> None:
        self.whole.add(seconds, data_wait_s, images, steps)
        if self.windows:
            self.after_first_window.add(seconds, data_wait_s, images, steps)
        self.windows += 1

    def describe(self) -> str:
        whole, steady = self.whole.summary(), self.after_first_window.summary()
        if whole["img_per_s"] is None:
            return "no step was timed"
        text = (f"{whole['steps']} steps, {whole['images']} images in {whole['seconds']:.1f} s: "
                f"{whole['img_per_s']:.0f} img/s, waiting for data {100 * whole['data_wait_fraction']:.1f}% of the time")
        if steady["img_per_s"] is not None:
            text += (f"; after the first logging window {steady['img_per_s']:.0f} img/s, "
                     f"waiting {100 * steady['data_wait_fraction']:.1f}%")
        return text


def set_aside_earlier_outputs(output_dir: str | Path, names: tuple[str, ...] = ("metrics.jsonl", "log.txt")) -> list[str]:
    """A run that starts afresh where an earlier one wrote but left no checkpoint to continue (--resume
    auto with nothing to continue) keeps that run's files ``names`` under other names, rather than
    writing over or after them: metrics.restarted.jsonl, then metrics.restarted_2.jsonl, ... -> what
    was moved."""
    moved = []
    for path in (Path(output_dir) / name for name in names):
        if not path.is_file() or path.stat().st_size == 0:
            continue
        target = set_aside(path, "restarted")
        moved.append(f"the earlier run's {path.name} is kept as {target.name}")
    return moved


def set_aside_lines_redone(output_dir: str | Path, step: int, epoch: int) -> list[str]:
    """A run resumed at optimizer step ``step`` (epoch ``epoch`` not yet done) logs again the steps and
    epochs after it, which the checkpoint's run may have logged already (an older checkpoint, or a
    kill after the last save). Their earlier lines move from metrics.jsonl and log.txt to the end of
    metrics.redone.jsonl and log.redone.txt, so the logs read as one run, and nothing is lost."""
    moved = []
    for name, later in (("metrics.jsonl", lambda r: r.get("step", 0) > step),
                        (EpochLog.NAME, lambda r: r.get("epoch", -1) >= epoch)):
        path = Path(output_dir) / name
        if not path.is_file():
            continue
        kept, redone = [], []
        for line in path.read_bytes().splitlines(keepends=True):
            try:
                record = json.loads(line)
            except ValueError:  # a line a kill cut short
                record = None
            (redone if not isinstance(record, dict) or later(record) else kept).append(line.rstrip(b"\n") + b"\n")
        if not redone:
            continue
        target = path.with_name(f"{path.stem}.redone{path.suffix}")
        with open(target, "ab") as file:
            file.writelines(redone)
        atomic_write(path, lambda file: file.writelines(kept))
        moved.append(f"{len(redone)} line(s) of {name} after the checkpoint (logged again by this run) moved to "
                     f"{target.name}")
    return moved


class MetricsLogger:
    def __init__(self, output_dir: str | Path, log_dir: str | Path | None, total_steps: int, start_step: int,
                 enabled: bool = True, progress_bar: bool = True, append: bool = False):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = None
        self.bar_settings = None
        self.writer = None
        self.epoch_log = None
        if not enabled:
            return
        self.epoch_log = EpochLog(output_dir, say=self.message, append=append)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a resumed run continues the file; a fresh run starts it anew. Unbuffered: a write the disk
        # refuses must leave its bytes here, to try again, not half in a buffer
        self.file = open(self.path, "ab" if append else "wb", buffering=0)
        self.pending = HeldBack(self.path, self.message, "the logging steps", "logging step(s)",
                                continues_a_line=append and self.path.stat().st_size and not _ends_with_newline(self.path))
        if log_dir is not None:
            self.writer = open_tensorboard(log_dir)
        self.bar_settings = dict(total=total_steps, initial=start_step) if progress_bar else None

    def advance(self, steps: int = 1) -> None:
        """An optimizer step is done. The bar appears at the first one, below the start-up messages."""
        if self.bar is None and self.bar_settings is not None:
            self.bar = tqdm(**self.bar_settings, unit="step", dynamic_ncols=True, file=sys.stderr, desc="pretrain")
        if self.bar is not None:
            self.bar.update(steps)

    def close_bar(self) -> None:
        """No more steps: later messages print below the finished bar."""
        if self.bar is not None:
            self.bar.close()
        self.bar, self.bar_settings = None, None

    def log(self, record: dict) -> None:
        """One logging step: ``record`` holds plain numbers (step, epoch, loss, lr, img_per_s, ...)."""
        if not self.enabled:
            return
        record = {k: _significant(v) for k, v in record.items()}
        self._write(json.dumps(record).encode() + b"\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['img_per_s']:.0f}", refresh=False)

    def log_epoch(self, record: dict) -> None:
        """An epoch done: the reference's log.txt line ({"train_lr", "train_loss", "epoch"})."""
        if self.enabled:
            self.epoch_log.append(record)

    def _write(self, data: bytes) -> None:
        self.pending.write(data, self.file.write)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.close_bar()
        if self.writer is not None:
            self.writer.close()
        self.epoch_log.close()
        self.pending.close(self.file.write)
        self.file.close()


def _significant(value, digits: int = 8):
    """A float to ``digits`` significant digits, not decimal places: a warm-up lr of 1.1286e-08 stays
    itself (8 decimal places made it 1e-08), and a loss near 1 keeps what 8 places kept of it."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{digits}g}")
    return value


class EpochLog:
    """The reference's ``log.txt`` in the output folder: one JSON object per epoch, appended as the
    reference appends it (a resumed run continues the file), for the scripts that read it. ``append``
    False: a run that starts afresh starts it anew, as metrics.jsonl (the commands refuse a fresh run in
    a folder holding an earlier run's outputs; what a run stopped before its first checkpoint logged is
    set aside first, ``set_aside_earlier_outputs``). A line the disk refuses waits here for the next
    epoch's write."""

    NAME = "log.txt"

    def __init__(self, output_dir: str | Path, say: Callable[[str], None] = print, append: bool = True):
        self.path = Path(output_dir) / self.NAME
        if not append and self.path.is_file():
            self.path.write_bytes(b"")
        self.pending = HeldBack(self.path, say, "the epochs' lines", "epoch line(s)",
                                continues_a_line=self.path.is_file() and self.path.stat().st_size
                                and not _ends_with_newline(self.path))

    def _append(self, data: bytes) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # opened for each epoch, as the reference does: nothing stays open between epochs
        with open(self.path, "ab", buffering=0) as file:
            return file.write(data)

    def append(self, record: dict) -> None:
        self.pending.write(json.dumps(record).encode() + b"\n", self._append)

    def close(self) -> None:
        self.pending.close(self._append)


class HeldBack:
    """What a log file has yet to receive. A full disk or a quota costs a long run its log lines for a
    while, not the run: the lines the disk refuses wait here and go in, in order, once there is room."""

    def __init__(self, path: Path, say: Callable[[str], None], held: str, lines: str, continues_a_line: bool):
        self.path, self.say, self.held, self.lines = path, say, held, lines
        # an earlier process stopped mid-line: the next record starts a line
        self.unwritten = b"\n" if continues_a_line else b""
        self.error: OSError | None = None  # why ``unwritten`` is not in the file yet

    def write(self, data: bytes, write: Callable[[bytes], int]) -> None:
        """Append ``data`` after whatever the disk refused before, through ``write`` (bytes -> bytes written)."""
        self.unwritten += data
        try:
            while self.unwritten:
                self.unwritten = self.unwritten[write(self.unwritten):]
        except OSError as err:
            if self.error is None:
                self.say(f"could not write to {self.path}: {err}; training goes on, and {self.held} wait in "
                         "memory until it can be written")
            self.error = err
            return
        if self.error is not None:
            self.say(f"{self.path} is written again, {self.held} held back included")
            self.error = None

    def close(self, write: Callable[[bytes], int]) -> None:
        if self.unwritten:
            self.write(b"", write)  # a last try
        lost = len([line for line in self.unwritten.split(b"\n") if line])
        if lost:
            self.say(f"{lost} {self.lines} could not be written to {self.path}: {self.error}")


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, 2)
        return file.read(1) == b"\n"


def read_metrics(metrics_path: str | Path) -> list[dict]:
    """The logging steps of metrics.jsonl. A line a killed process left half-written is passed over."""
    records = []
    for line in Path(metrics_path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and {"step", "loss", "lr"} <= record.keys():
            records.append(record)
    return records


def as_one_run(records: list[dict]) -> list[dict]:
    """The records of a run resumed from a checkpoint older than its last logged step, as one run: a
    step logged again (the resumed process recomputes it) replaces what was logged from there on."""
    run: list[dict] = []
    for record in records:
        while run and run[-1]["step"] >= record["step"]:
            run.pop()
        run.append(record)
    return run


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Path:
    """loss and lr against the optimizer step, from metrics.jsonl, as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = as_one_run(read_metrics(metrics_path))
    if not records:
        raise ValueError(f"{metrics_path} holds no logging steps to plot")
    steps = [r["step"] for r in records]
    figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=100)
    loss_axis.plot(steps, [r["loss"] for r in records], color="tab:blue")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("loss (masked patches)", color="tab:blue")
    lr_axis = loss_axis.twinx()
    lr_axis.plot(steps, [r["lr"] for r in records], color="tab:orange", alpha=0.6)
    lr_axis.set_ylabel("learning rate", color="tab:orange")
    loss_axis.set_title("MAE pretraining")
    figure.tight_layout()
    try:
        atomic_write(png_path, lambda f: figure.savefig(f, format="png"))
    finally:
        plt.close(figure)
    return Path(png_path)
