"""Timing a training step honestly: warm-up, per-step device timing, throughput, median and spread.

Throughput (img/s, and the MFU and speed-ups made from it) is the images of the timed steps over
their total time: what a run sustains. The median step time is reported beside it with its spread;
batch / median would overstate a run whose steps are skewed by slow ones (the host's hiccups, a
garbage collection), which training pays for too.

On CUDA each step is bracketed by CUDA events (no host synchronisation between steps, so the GPU
queue stays full as in training); the events are read after one synchronisation at the end. A
synchronise-then-host-clock wall time over all timed steps is kept beside them as a cross-check.
On CPU operations are synchronous and the host clock times each step.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
from tqdm import tqdm


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepTimes:
    """Seconds per step of the timed steps, and their summary."""

    times_s: list[float]
    wall_s: float  # synchronised host clock around all timed steps
    batch_size: int
    first_step_s: float | None = None  # the first warm-up step: compilation and autotuning happen there

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.times_s)
        position = q * (len(ordered) - 1)
        low, high = int(position), min(int(position) + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    @property
    def mean_s(self) -> float:
        return sum(self.times_s) / len(self.times_s)

    @property
    def images_per_s(self) -> float:
        """Sustained: the timed steps' images over their total time."""
        return self.batch_size / self.mean_s

    def summary(self) -> dict:
        return {
            "mean_s": self.mean_s,
            "median_s": self.median_s,
            "p10_s": self.quantile(0.10),
            "p90_s": self.quantile(0.90),
            "iqr_s": self.quantile(0.75) - self.quantile(0.25),
            "min_s": min(self.times_s),
            "max_s": max(self.times_s),
            "relative_spread": (self.quantile(0.90) - self.quantile(0.10)) / self.median_s,
            "images_per_s": self.images_per_s,
            "images_per_s_wall": self.batch_size * len(self.times_s) / self.wall_s,
            "steps": len(self.times_s),
            "first_step_s": self.first_step_s,
        }


@dataclass(frozen=True)
class TimingPlan:
    warmup_steps: int
    timed_steps: int

    def __post_init__(self):
        if self.warmup_steps < 0 or self.timed_steps < 1:
            raise ValueError(f"--warmup must be >= 0 and --steps >= 1, got --warmup {self.warmup_steps} "
                             f"--steps {self.timed_steps}")

    def as_dict(self) -> dict:
        return asdict(self)


def time_steps(step: Callable[[], object], plan: TimingPlan, device: torch.device, batch_size: int,
               label: str = "", progress: bool = True) -> StepTimes:
    """Run ``step`` plan.warmup_steps times untimed, then plan.timed_steps times timed."""
    bar = tqdm(total=plan.warmup_steps + plan.timed_steps, desc=label, unit="step", leave=False, disable=not progress)
    first_step_s = None
    for index in range(plan.warmup_steps):
        t0 = time.perf_counter()
        step()
        if index == 0:
            synchronize(device)
            first_step_s = time.perf_counter() - t0
        bar.update()
    synchronize(device)
    times: list[float] = []
    wall_start = time.perf_counter()
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(plan.timed_steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
            bar.update()
        synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(plan.timed_steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            bar.update()
            bar.set_postfix(img_s=f"{batch_size / times[-1]:.1f}")
    wall = time.perf_counter() - wall_start
    bar.close()
    return StepTimes(times, wall, batch_size, first_step_s)


class SyntheticImages:
    """A few fixed random batches on the device, handed out in turn, so that no single input sits in
    cache across steps; generating them is not part of the timed step."""

    def __init__(self, batch_size: int, img_size: int, device: torch.device, count: int = 4, in_chans: int = 3):
        generator = torch.Generator(device="cpu").manual_seed(0)
        self.batches = [
            torch.randn(batch_size, in_chans, img_size, img_size, generator=generator).to(device)
            for _ in range(count)
        ]
        self._cycle = itertools.cycle(self.batches)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:  # [N, C, H, W]
        return next(self._cycle)


class EndlessLoader:
    """Batches of an ``ImageBatches`` loader (fastmae.data.loader), epoch after epoch."""

    def __init__(self, loader):
        self.loader = loader
        self.epoch = 0
        self._it = self._start()

    def _start(self):
        self.loader.set_epoch(self.epoch)
        return iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = self._start()
            return next(self._it)
