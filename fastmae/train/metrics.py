"""What a run reports: a tqdm bar (loss, lr, img/s), ``metrics.jsonl`` (one JSON object per logging
step), and TensorBoard scalars when the ``tensorboard`` package is installed. Only rank 0 reports."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this run: allocated GPU memory on CUDA, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kilobytes / 2**20


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(log_dir))


class MetricsLogger:
    def __init__(self, output_dir: str | Path, log_dir: str | Path | None, total_steps: int, start_step: int,
                 enabled: bool = True, progress_bar: bool = True, append: bool = False):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = None
        self.bar_settings = None
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a resumed run continues the file; a fresh run starts it anew
        self.file = open(self.path, "a" if append else "w", encoding="utf-8")
        if log_dir is not None:
            self.writer = _tensorboard_writer(Path(log_dir))
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
        record = {k: (round(v, 8) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['img_per_s']:.0f}", refresh=False)

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
        self.file.close()


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Path:
    """loss and lr against the optimizer step, from metrics.jsonl, as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
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
    figure.savefig(png_path)
    plt.close(figure)
    return Path(png_path)
