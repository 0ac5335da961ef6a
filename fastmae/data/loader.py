"""One interface for every pretraining data pipeline, and the CPU (PIL) pipeline behind it.

``build_loader(cfg, rank, world_size, device)`` returns an ``ImageBatches``: iterate it for
normalised image batches of this rank's shard, ``set_epoch`` it before each epoch. Loaders:

- ``cpu``: PIL decode and augmentation in DataLoader worker processes (this module).
- ``hybrid``: PIL decode and crop in worker processes, the resize, flip and normalisation on the
  device (``fastmae.data.hybrid``): the workers skip the resize, about half their work.
- ``dali``: nvJPEG decode on the GPU (``fastmae.data.dali``).
- ``torchvision``: torchvision's GPU ``decode_jpeg`` (``fastmae.data.gpu_decode``).
- ``auto``: dali if installed and the device is CUDA, else hybrid on CUDA, else cpu. The embedded
  photographs are in memory, not files, so they always use ``cpu``.

On CUDA the CPU and hybrid loaders copy each batch to the GPU and finish it there on a side stream,
one batch ahead, so that work overlaps the training step instead of queueing in front of it.

Every random choice of the CPU pipeline is a function of (seed, epoch, position in the epoch), not
of worker processes or of what ran before, so a run resumed mid-epoch sees the same batches.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import multiprocessing
import os
import re
import signal
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from fastmae.data.augment import (CROP_RATIO, CROP_SCALE, IMAGENET_MEAN, IMAGENET_STD, normalize, random_resized_crop_flip,
                                  resize_center_crop)
from fastmae.data.sources import ImageSource, open_source, shard_indices

LOADER_CHOICES = ("auto", "dali", "torchvision", "hybrid", "cpu")
LOADER_PACKAGES = {  # loader -> (the module it needs, how to install it)
    "dali": ("nvidia.dali", "pip install 'fastmae[dali]'"),
    "torchvision": ("torchvision", "pip install torchvision, the build that matches your torch"),
}
# An item that fails to decode is replaced by the next item; this many failures in a row is an error.
MAX_CONSECUTIVE_UNREADABLE = 32
T = TypeVar("T")


class UnreadableData(ValueError):
    """So many unreadable images in a row that the data itself is broken (wrong folder, files not
    images, a storage fault): said with the files and why, not as a loader worker's traceback."""

    def __init__(self, unreadable: list[str]):
        super().__init__(f"{len(unreadable)} unreadable images in a row, e.g. {'; '.join(unreadable[:3])}: "
                         "check the files under --data_path")


def why_unreadable(error: Exception, name: str) -> str:
    """One line for a skipped file's message (PIL's repeat the file's name, or the in-memory file a tar
    member is read into: dropped)."""
    text = str(error).strip().splitlines()[0].replace(f" '{name}'", "") if str(error).strip() else ""
    text = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", text)
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def load_or_next(load: Callable[[int], T], name: Callable[[int], str], index: int,
                 count: int) -> tuple[T | None, list[str]]:
    """``load(index)``, or where it raises (a truncated or non-image file) the first of the items after it
    (of ``count``, wrapping) that loads -> (its result, or None after MAX_CONSECUTIVE_UNREADABLE failures in
    a row, or once every item failed; each failed item's name and why, for the replacement to be counted
    and said, never silent)."""
    unreadable = []
    for attempt in range(min(MAX_CONSECUTIVE_UNREADABLE, count)):
        item = (index + attempt) % count
        try:
            return load(item), unreadable
        except Exception as error:
            unreadable.append(f"{name(item)} ({why_unreadable(error, name(item))})")
    return None, unreadable


@dataclass
class DataConfig:
    data_path: str | None  # None = the embedded default photographs
    input_size: int = 224
    batch_size: int = 64  # per rank
    num_workers: int = 8
    pin_mem: bool = True
    seed: int = 0
    loader: str = "auto"  # auto | dali | torchvision | hybrid | cpu
    scale: tuple[float, float] = CROP_SCALE
    ratio: tuple[float, float] = CROP_RATIO
    samples_per_epoch: int | None = None  # embedded source only: crops per epoch
    drop_last: bool = True  # as the reference DataLoader: every batch is full

    def __post_init__(self):
        if self.loader not in LOADER_CHOICES:
            raise ValueError(f"data loader must be one of {LOADER_CHOICES}, got {self.loader!r}")
        if self.input_size <= 0 or self.batch_size <= 0 or self.num_workers < 0:
            raise ValueError(
                f"input_size and batch_size must be positive and num_workers >= 0, got "
                f"{self.input_size}, {self.batch_size}, {self.num_workers}"
            )


class ImageBatches(Protocol):
    """What every loader returns.

    Iterating yields imgs [B, 3, S, S] float32, ImageNet-normalised, on the device the loader was
    built for (the CPU loader moves uint8 pixels and normalises there). ``len`` is the number of
    batches per epoch on this rank. ``set_epoch(epoch, start_batch)`` must be called before each
    epoch: it reshuffles with the run's seed and, for a resumed run, starts at batch
    ``start_batch`` of that epoch without decoding the batches before it. ``skipped`` counts the
    unreadable items replaced so far (the trainer logs it).
    """

    skipped: int

    def __iter__(self) -> Iterator[torch.Tensor]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...


def build_loader(cfg: DataConfig, rank: int, world_size: int, device: torch.device) -> ImageBatches:
    device = torch.device(device)
    kind = resolve_loader(cfg, device)
    if kind == "dali":
        from fastmae.data.dali import build_dali_loader

        return build_dali_loader(cfg, rank, world_size, device)
    if kind == "torchvision":
        from fastmae.data.gpu_decode import build_torchvision_loader

        return build_torchvision_loader(cfg, rank, world_size, device)
    if kind == "hybrid":
        from fastmae.data.hybrid import HybridLoader

        return HybridLoader(cfg, rank, world_size, device)
    return CPULoader(cfg, rank, world_size, device)


def resolve_loader(cfg: DataConfig, device: torch.device) -> str:
    """The loader ``cfg.loader`` means on ``device`` (see the module docstring)."""
    if cfg.loader != "auto":
        if cfg.loader in ("dali", "torchvision") and cfg.data_path is None:
            raise ValueError(f"the {cfg.loader} loader reads files; the embedded photographs need --data_loader cpu or auto")
        if cfg.loader in LOADER_PACKAGES and not _importable(LOADER_PACKAGES[cfg.loader][0]):
            module, install = LOADER_PACKAGES[cfg.loader]
            raise ValueError(f"--data_loader {cfg.loader} needs the {module} package, which is not installed "
                             f"({install}); --data_loader hybrid or cpu need nothing more")
        return cfg.loader
    if cfg.data_path is None or device.type != "cuda":
        return "cpu"
    if _importable("nvidia.dali") and _importable("fastmae.data.dali"):
        return "dali"
    # Not torchvision's nvJPEG: its Huffman decoding runs on one host thread (2323 img/s on an H100
    # machine, where 16 PIL workers made 3719 with the resize on the CPU, which hybrid moves off it).
    return "hybrid"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing
        return False


class _AugmentedItems(Dataset):
    """key (item index, epoch, position) -> (uint8 [3, S, S], names of unreadable items passed over).
    Subclasses change what ``augment`` makes of the image; the draws and replacements stay."""

    def __init__(self, source: ImageSource, cfg: DataConfig):
        self.source = source
        self.size = cfg.input_size
        self.scale = cfg.scale
        self.ratio = cfg.ratio
        self.seed = cfg.seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, list[str]]:
        index, epoch, position = key
        rng = np.random.default_rng([self.seed, epoch, position])
        image, unreadable = load_or_next(self.source.load, self.source.name, index, len(self.source))
        if image is None:
            return None, unreadable  # raised as UnreadableData in the main process, not as a worker's traceback
        return self.augment(image, rng), unreadable

    def augment(self, image, rng: np.random.Generator):
        return torch.from_numpy(random_resized_crop_flip(image, self.size, rng, self.scale, self.ratio)).permute(2, 0, 1)


def _collate_unless_unreadable(collate, samples: list[tuple]) -> tuple:
    """``collate(samples)``, or (None, [names]) where an item gave up: its unreadable run's names."""
    for pixels, names in samples:
        if pixels is None:
            return None, [names]
    return collate(samples)


def replacements(samples: list[tuple]) -> list[list[str]]:
    """Per item of a batch that was replaced, the unreadable items passed over for it (the keyed item
    first: one replacement, however many bad neighbours it passed)."""
    return [names for _, names in samples if names]


def _collate(samples: list[tuple[torch.Tensor, list[str]]]) -> tuple[torch.Tensor, list[list[str]]]:
    first = samples[0][0]
    out = batch_buffer(len(samples) * first.numel()).view(len(samples), *first.shape)
    return torch.stack([pixels for pixels, _ in samples], out=out), replacements(samples)


def batch_buffer(numel: int) -> torch.Tensor:
    """uint8 [numel] for a collated batch: in a DataLoader worker, allocated in shared memory, as
    torch's default_collate does, so handing the batch to the main process copies nothing (moving
    a 70 MB batch there afterwards took about twice as long as allocating it there)."""
    if get_worker_info() is None:
        return torch.empty(numel, dtype=torch.uint8)
    empty = torch.empty(0, dtype=torch.uint8)
    return empty.new(empty._typed_storage()._new_shared(numel))


class SkipLog:
    """Unreadable images replaced by the next one: every replacement counted (an item drawn, whose
    image is another's), each unreadable file warned about once."""

    def __init__(self):
        self.count = 0
        self._warned: set[str] = set()

    def record(self, replaced: list[list[str]], stacklevel: int = 1) -> None:
        """replaced: per replaced item, the unreadable items passed over for it (``replacements``).
        stacklevel counts from record's caller, as warnings.warn's counts from its own caller."""
        self.count += len(replaced)
        new = list(dict.fromkeys(m for passed in replaced for m in passed if m not in self._warned))
        if new:
            self._warned.update(new)
            warnings.warn(f"skipped unreadable image(s), replaced by the next one: {'; '.join(new[:5])}",
                          stacklevel=stacklevel + 1)


class EpochBatchSampler:
    """Batches of dataset keys for one epoch of one rank, from ``start_batch`` on. Every loader
    (CPU, DALI, torchvision) takes its order from here, so they agree sample for sample."""

    def __init__(self, num_items: int, cfg: DataConfig, rank: int, world_size: int):
        self.num_items, self.batch_size = num_items, cfg.batch_size
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, cfg.seed, cfg.drop_last
        self.epoch, self.start_batch = 0, 0
        per_rank = -(-num_items // world_size)
        self.num_batches = per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)
        if self.num_batches == 0:
            raise ValueError(
                f"{num_items} images make no full batch of {cfg.batch_size} per rank on {world_size} rank(s); "
                f"lower --batch_size or add images"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} is outside the epoch's {self.num_batches} batches")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return max(self.num_batches - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        return self.batches(self.epoch, self.start_batch)

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[list[tuple[int, int, int]]]:
        """Epoch ``epoch``'s batches from ``start_batch`` on, whatever ``set_epoch`` last said."""
        indices = shard_indices(self.num_items, epoch, self.seed, self.rank, self.world_size)
        for b in range(start_batch, self.num_batches):
            rows = range(b * self.batch_size, min((b + 1) * self.batch_size, len(indices)))
            # position in the epoch's global order, so every sample has its own augmentation seed
            yield [(int(indices[r]), epoch, r * self.world_size + self.rank) for r in rows]


class _EpochsInARow:
    """The batch sampler of a worker loader: ``sampler``'s batches from (epoch, start_batch) on, then
    every batch of each following epoch, without end. Workers that read ahead then read into the next
    epoch while the current one ends, where a sampler of one epoch leaves them idle until the next
    epoch's iterator starts: on a dataset of 20 batches an epoch, a ViT-B run on an H100 waited for
    data 48% of its time. The keys carry their epoch, so every batch is the one the epoch's own sampler
    makes."""

    def __init__(self, sampler: EpochBatchSampler):
        self.sampler = sampler
        self.epoch, self.start_batch = 0, 0

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch, start = self.epoch, self.start_batch
        while True:
            yield from self.sampler.batches(epoch, start)
            epoch, start = epoch + 1, 0


def _leave_stop_signals_to_the_main_process(main_exiting, worker_id: int) -> None:
    """Ctrl-C, and SIGTERM from Slurm's preemption, `timeout` or `kill -TERM -PGID`, reach the whole
    process group. The main process saves and stops the run, and the workers must keep serving it
    until then: a worker killed by the signal makes the DataLoader raise in the main process, in the
    middle of the step or of the checkpoint's write (and under DDP, a rank without its batch would
    leave the others waiting in the step's all-reduce).

    So the workers ignore SIGINT, and SIGTERM until ``main_exiting`` is set. The main process sets it
    as it exits (atexit), before multiprocessing's own exit hook terminates the workers still alive
    with SIGTERM and waits for them: after an error, or when the DataLoader was not shut down first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_sigterm(signum, frame):
        if main_exiting.is_set():
            os._exit(0)  # now, without flushing queues to a main process that no longer reads them

    signal.signal(signal.SIGTERM, on_sigterm)


class CPULoader:
    """PIL decode + augmentation in ``num_workers`` processes; batches normalised on ``device``.
    Subclasses set what the workers make (``items``, ``collate``) and how it becomes images (``images``)."""

    items = _AugmentedItems
    collate = staticmethod(_collate)

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, device: torch.device):
        self.cfg = cfg
        self.device = torch.device(device)
        self.source = open_source(cfg.data_path, cfg.samples_per_epoch)
        self.sampler = EpochBatchSampler(len(self.source), cfg, rank, world_size)
        self._skips = SkipLog()
        items = self.items(self.source, cfg)
        # a source of nothing but unreadable files fails here, before training, not at its first step
        if items[(0, 0, 0)][0] is None:
            raise ValueError(f"no readable image among the first items of {cfg.data_path}: "
                             f"{UnreadableData(items[(0, 0, 0)][1])}")
        worker_init = None
        if cfg.num_workers > 0:
            main_exiting = multiprocessing.Event()
            atexit.register(main_exiting.set)  # runs before multiprocessing's exit hook, registered earlier
            worker_init = functools.partial(_leave_stop_signals_to_the_main_process, main_exiting)
        # with workers, one stream of batches runs on from epoch to epoch (_EpochsInARow); an epoch takes
        # its batches from it, and the stream starts anew where an epoch begins elsewhere than where it is
        self._epochs = _EpochsInARow(self.sampler)
        self._stream: Iterator | None = None
        self._stream_next: tuple[int, int] | None = None  # (epoch, batch) of the stream's next batch, or None
        self._loader = DataLoader(
            items,
            batch_sampler=self._epochs if cfg.num_workers > 0 else self.sampler,
            num_workers=cfg.num_workers,
            collate_fn=functools.partial(_collate_unless_unreadable, self.collate),
            pin_memory=cfg.pin_mem and self.device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,
            prefetch_factor=4 if cfg.num_workers > 0 else None,
            worker_init_fn=worker_init,
        )

    def __len__(self) -> int:
        return self.sampler.num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.device.type == "cuda":
            yield from one_batch_ahead_on_side_stream(self._host_batches(), self.images, self.device)
            return
        for batch in self._host_batches():
            yield self.images(*batch)

    def _host_batches(self) -> Iterator[list]:
        """What the workers collated, batch by batch, without the names of the unreadable items
        passed over (logged here)."""
        for *batch, unreadable in self._collated():
            if batch[0] is None:
                raise UnreadableData(unreadable[0])
            if unreadable:
                self._skips.record(unreadable, stacklevel=1)
            yield batch

    def _collated(self) -> Iterator[tuple]:
        """The current epoch's collated batches (``set_epoch``): without workers from the epoch's own
        sampler; with them, from the stream of epochs, started anew unless its next batch is this
        epoch's first."""
        if self.cfg.num_workers == 0:
            yield from self._loader
            return
        epoch, start, end = self.sampler.epoch, self.sampler.start_batch, self.sampler.num_batches
        if self._stream_next != (epoch, start):  # None until a stream has given a batch whole
            self._epochs.epoch, self._epochs.start_batch = epoch, start  # read when the iterator starts
            self._stream = iter(self._loader)
        for b in range(start, end):
            self._stream_next = None  # until the batch is in hand: a failure leaves the stream to start anew
            collated = next(self._stream)
            self._stream_next = (epoch, b + 1) if b + 1 < end else (epoch + 1, 0)
            yield collated

    def images(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] from the workers -> the batch, normalised on the device."""
        return normalize(pixels.to(self.device, non_blocking=True), IMAGENET_MEAN, IMAGENET_STD)

    @property
    def skipped(self) -> int:
        return self._skips.count


def one_batch_ahead_on_side_stream(host_batches: Iterator[list], to_device, device: torch.device) -> Iterator[torch.Tensor]:
    """``to_device(*batch)`` for each batch, run on a side stream one batch ahead of the consumer.

    On the consumer's stream the copy to the GPU and the loader's work there (normalisation; the
    hybrid loader's resizes) would queue in front of the next training step and hold it up; on a
    side stream, started before the consumer launches the current step, they overlap that step.
    """
    stream = torch.cuda.Stream(device)
    consumer = torch.cuda.current_stream(device)
    pending = None
    for batch in host_batches:
        with torch.cuda.stream(stream):
            images = to_device(*batch)
        following = (images, stream.record_event())
        if pending is not None:
            yield hand_over(*pending, consumer)
        pending = following
    if pending is not None:
        yield hand_over(*pending, consumer)


def hand_over(images: torch.Tensor, ready: torch.cuda.Event, consumer: torch.cuda.Stream) -> torch.Tensor:
    """A batch made on a side stream, ``ready`` when done, for use on ``consumer``."""
    consumer.wait_event(ready)
    images.record_stream(consumer)  # made on the side stream, used (and freed) on the consumer's
    return images


def preview_batch(cfg: DataConfig, count: int = 8) -> torch.Tensor:
    """Up to ``count`` distinct images spread over the source, centre-cropped to input_size and
    normalised: [N, 3, S, S] on the CPU (for reconstruction figures). Unreadable files are passed over."""
    source = open_source(cfg.data_path, cfg.samples_per_epoch)
    distinct = getattr(source, "num_distinct", len(source))
    pixels = []
    for index in np.linspace(0, distinct - 1, min(count, distinct)).round().astype(int):
        for item in range(index, min(index + MAX_CONSECUTIVE_UNREADABLE, distinct)):
            try:
                image = source.load(int(item))
            except Exception:
                continue
            pixels.append(torch.from_numpy(resize_center_crop(image, cfg.input_size)).permute(2, 0, 1))
            break
    if not pixels:
        raise ValueError(f"no readable image in {cfg.data_path} for the reconstruction figure")
    return normalize(torch.stack(pixels), IMAGENET_MEAN, IMAGENET_STD)
