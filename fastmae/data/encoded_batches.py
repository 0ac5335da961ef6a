"""The host half of the GPU loaders: this rank's epoch as batches of encoded files, each row with
the crop box and flip it gets, read ahead by background threads.

The GPU decoders (DALI's nvJPEG, torchvision's ``decode_jpeg``) take the files' bytes; every
random choice is made here, on the host, exactly as the CPU loader makes it: the same
``EpochBatchSampler`` order (shuffle per epoch with the run's seed, rank shard, mid-epoch start),
one generator per sample seeded by (seed, epoch, position), the crop box from
``augment.sample_resized_crop`` and then the flip. So a given sample gets the same crop and flip
whichever loader decodes it, and a resumed run sees the same batches.

Files that cannot be decoded are replaced by the next item of the source, as the CPU loader does,
and counted in ``skipped``: ``image_header.read_header`` catches empty, non-image, cut-short and
truncated files before any decoder sees them; a loader whose decoder still fails on a file
(damage inside the compressed data) calls ``replan`` to replace it.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from fastmae.data.augment import HFLIP_PROB, sample_resized_crop
from fastmae.data.image_header import BadImageError, ImageHeader, read_header
from fastmae.data.loader import MAX_CONSECUTIVE_UNREADABLE, DataConfig, EpochBatchSampler, SkipLog, UnreadableData
from fastmae.data.sources import ImageFiles, ImageSource


@dataclass
class EncodedBatch:
    files: list[np.ndarray]  # B x uint8 [num_bytes]: the encoded images
    headers: list[ImageHeader]  # B: format and size of each file
    boxes: np.ndarray  # int64 [B, 4]: crop box (top, left, height, width) in source pixels
    flips: np.ndarray  # bool [B]: horizontal flip after the crop
    keys: list[tuple[int, int, int]]  # B: the sampler's (item, epoch, position) each row was planned from
    items: list[int]  # B: the source item each row holds (a replacement when the keyed one was bad)
    # per row whose keyed item was unreadable: "name: why" of each item passed over for it
    skipped: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)


def read_encoded(source: ImageSource, item: int) -> bytes:
    """The encoded bytes of one item of a file-backed source."""
    if hasattr(source, "read_bytes"):  # tar shards
        return source.read_bytes(item)
    if isinstance(source, ImageFiles):
        with open(source.paths[item], "rb") as file:
            return file.read()
    raise ValueError(f"GPU loaders decode files; {type(source).__name__} holds decoded images (use the cpu loader)")


class EncodedBatchReader:
    """Iterate for this rank's ``EncodedBatch``es of the current epoch, from ``start_batch`` on."""

    def __init__(self, source: ImageSource, cfg: DataConfig, rank: int, world_size: int,
                 num_io_threads: int = 8, prefetch_batches: int = 4):
        self.source, self.cfg = source, cfg
        self.sampler = EpochBatchSampler(len(source), cfg, rank, world_size)
        self.num_io_threads, self.prefetch_batches = max(1, num_io_threads), max(1, prefetch_batches)
        self.undecodable: dict[int, str] = {}  # item -> why it is broken; passed over whenever it comes up
        self._skips = SkipLog()
        try:  # a source of nothing but unreadable files fails here, before training, not at its first step
            self.plan_row((0, 0, 0))
        except UnreadableData as error:
            raise ValueError(f"no readable image among the first items of {cfg.data_path}: {error}") from None

    def __len__(self) -> int:
        return self.sampler.num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def plan_row(self, key: tuple[int, int, int]):
        """(item, bytes, header, box, flip, skipped) for one sampler key; bad items give way to the next."""
        index, epoch, position = key
        skipped = []
        for attempt in range(min(MAX_CONSECUTIVE_UNREADABLE, len(self.source))):
            item = (index + attempt) % len(self.source)
            if item in self.undecodable:
                skipped.append(f"{self.source.name(item)}: {self.undecodable[item]}")
                continue
            try:
                data = read_encoded(self.source, item)
                header = read_header(data)
            except (OSError, BadImageError) as error:
                self.undecodable[item] = str(error)
                skipped.append(f"{self.source.name(item)}: {error}")
                continue
            # the CPU loader's draws, in its order: crop box, then flip
            rng = np.random.default_rng([self.cfg.seed, epoch, position])
            box = sample_resized_crop(header.height, header.width, self.cfg.scale, self.cfg.ratio, rng)
            flip = rng.random() < HFLIP_PROB
            return item, np.frombuffer(data, dtype=np.uint8), header, box, flip, skipped
        raise UnreadableData(skipped)

    def plan_batch(self, keys: list[tuple[int, int, int]], pool: ThreadPoolExecutor | None = None) -> EncodedBatch:
        rows = list(pool.map(self.plan_row, keys)) if pool is not None else [self.plan_row(k) for k in keys]
        return EncodedBatch(
            files=[row[1] for row in rows],
            headers=[row[2] for row in rows],
            boxes=np.array([row[3] for row in rows], dtype=np.int64).reshape(len(rows), 4),
            flips=np.array([row[4] for row in rows], dtype=bool),
            keys=list(keys),
            items=[row[0] for row in rows],
            skipped=[row[5] for row in rows if row[5]],
        )

    def replan(self, batch: EncodedBatch, bad_rows: list[int], reason: str = "the decoder failed on it") -> EncodedBatch:
        """The batch with the items of ``bad_rows`` marked undecodable and replaced (same keys)."""
        for row in bad_rows:
            self.undecodable[batch.items[row]] = reason
        return self.plan_batch(batch.keys)  # its `skipped` lists the old and the new bad items

    def report(self, batch: EncodedBatch) -> None:
        """Count the batch's skipped items once it is delivered; warn once per item."""
        if batch.skipped:
            self._skips.record(batch.skipped, stacklevel=3)

    @property
    def skipped(self) -> int:
        return self._skips.count

    def __iter__(self) -> Iterator[EncodedBatch]:
        """Batches read ``prefetch_batches`` ahead by a background thread (file reads in a pool)."""
        return run_ahead(self._planned_batches(), self.prefetch_batches, name="fastmae-encoded-batches")

    def _planned_batches(self) -> Iterator[EncodedBatch]:
        with ThreadPoolExecutor(self.num_io_threads, thread_name_prefix="fastmae-read") as pool:
            for keys in self.sampler:
                yield self.plan_batch(keys, pool)


class ReaderBackedBatches:
    """The ImageBatches bookkeeping of a GPU loader: its EncodedBatchReader decides the epoch order,
    the rank's share, the mid-epoch start and the skipped files; the loader only decodes."""

    reader: EncodedBatchReader

    @property
    def skipped(self) -> int:
        return self.reader.skipped

    def __len__(self) -> int:
        return len(self.reader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.reader.set_epoch(epoch, start_batch)


def run_ahead(items: Iterator, depth: int, name: str) -> Iterator:
    """Iterate ``items`` on a background thread, up to ``depth`` items ahead of the consumer. Its
    exceptions are raised in the consumer; leaving the loop early stops and closes it."""
    ready: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(done)
        except BaseException as error:  # handed to the consumer, which re-raises it
            ready.put(error)
        finally:
            items.close()

    producer = threading.Thread(target=produce, name=name, daemon=True)
    producer.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while producer.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get_nowait()
            except queue.Empty:
                producer.join(timeout=0.05)
