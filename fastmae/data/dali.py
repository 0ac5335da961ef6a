"""The DALI loader: nvJPEG decoding ("mixed": hardware JPEG decoder plus CUDA) of each image's crop
window only, cubic resize, flip and normalisation on the GPU, prefetched; NCHW out.

Files, crop boxes and flips come from ``encoded_batches.EncodedBatchReader`` (the CPU loader's
shuffle, shard and random draws), fed to the pipeline through ``fn.external_source``. Without a
GPU (device_id None) the same pipeline decodes on the CPU ("cpu" operators), which is what the
tests run.

A file that passes the header check but still fails to decode (damage inside the compressed data)
makes DALI fail the whole batch. The loader then decodes that batch's files one by one in a
single-image pipeline of the same kind to find the bad ones, replaces them (counted in
``skipped``), rebuilds the pipeline and feeds the repaired batch and the ones queued behind it
again, in order.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from typing import Iterator

import numpy as np
import torch

from fastmae.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fastmae.data.encoded_batches import EncodedBatch, EncodedBatchReader, ReaderBackedBatches
from fastmae.data.loader import MAX_CONSECUTIVE_UNREADABLE, DataConfig
from fastmae.data.sources import open_source

# The hardware decoder's share of the JPEGs; the rest go to the CUDA (hybrid) decoder at the same
# time. NVIDIA's recommended A100 value; `fastmae bench data --hw_decoder_load` sweeps it per GPU.
DEFAULT_HW_DECODER_LOAD = 0.65
# Largest ImageNet image: lets the hardware decoder allocate once (NVIDIA's RN50 example values).
PREALLOCATE_WIDTH, PREALLOCATE_HEIGHT = 5980, 6430
# Rebuilds for one batch without a batch coming out: each replaces at least one undecodable file, so
# only a run of them as long as the unreadable run that stops the CPU loaders is a dead end.
MAX_REBUILDS_IN_A_ROW = MAX_CONSECUTIVE_UNREADABLE


def build_dali_loader(cfg: DataConfig, rank: int, world_size: int, device: torch.device, **options) -> "DALILoader":
    return DALILoader(cfg, rank, world_size, device, **options)


class BatchFeed:
    """The pipeline's external_source callback and its state: the next batch's files, crop anchors
    and shapes, and flips.

    The pipeline holds this, never the loader. With a reference from the pipeline back to the loader,
    a loader nobody uses is freed only by the cyclic garbage collector, which may run in a forked
    DataLoader worker: there DALI's pipeline destructor waits forever for threads that were not
    forked. Without the cycle the loader and its pipeline go as soon as the last reference does, in
    the process that built them."""

    def __init__(self):
        self.batches: Iterator[EncodedBatch] | None = None
        self.replay: deque[EncodedBatch] = deque()  # batches to feed again after a rebuild
        self.in_flight: deque[EncodedBatch] = deque()  # fed to the pipeline, output not yet taken
        self.error: BaseException | None = None  # raised by the reader inside DALI's callback

    def __call__(self):
        try:
            batch = self.replay.popleft() if self.replay else next(self.batches)  # StopIteration ends the epoch
        except StopIteration:
            raise
        except Exception as error:
            self.error = error
            raise
        self.in_flight.append(batch)
        boxes = batch.boxes.astype(np.float32)  # (top, left, h, w)
        anchors = list(np.ascontiguousarray(boxes[:, [1, 0]]))  # (x, y): DALI's "WH" axis order
        shapes = list(np.ascontiguousarray(boxes[:, [3, 2]]))  # (w, h)
        flips = list(batch.flips.astype(np.int32))
        return batch.files, anchors, shapes, flips


class DALILoader(ReaderBackedBatches):
    """``ImageBatches`` decoded by DALI: float32 [B, 3, S, S] on ``device`` (a CUDA device, or the CPU
    for DALI's CPU mode)."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, device: torch.device, *,
                 num_threads: int | None = None, hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD,
                 prefetch_queue_depth: int = 2, decode_only: bool = False):
        import nvidia.dali  # noqa: F401  (fail here, with the package's name, if it is missing)

        if cfg.data_path is None:
            raise ValueError("the dali loader reads files: give --data_path (the embedded photographs need the cpu loader)")
        self.cfg = cfg
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        elif self.device.type == "cpu":
            self.device_id = None  # DALI's CPU mode
        else:
            raise ValueError(f"the dali loader runs on a CUDA device or the CPU, not {self.device}")
        if not 0.0 <= hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {hw_decoder_load}")
        # DALI's CPU threads: per-sample host work (file parsing, CPU-mode decoding); one per core
        # up to the worker count the CPU loader would use.
        self.num_threads = num_threads or max(1, min(cfg.num_workers or 1, os.cpu_count() or 1))
        self.hw_decoder_load = hw_decoder_load
        self.prefetch_queue_depth = prefetch_queue_depth
        self.decode_only = decode_only  # benchmarks: decode the full image, no crop/resize/flip
        self.reader = EncodedBatchReader(open_source(cfg.data_path), cfg, rank, world_size,
                                         num_io_threads=max(4, self.num_threads))
        self._pipeline = None
        self._probe = None
        self._feed = BatchFeed()
        self.pipeline_builds = 0  # 1 + epochs left early + recoveries from undecodable files

    def __iter__(self) -> Iterator[torch.Tensor]:
        feed = self._feed
        if self._pipeline is None or feed.in_flight or feed.replay:  # first epoch, or the last one was left early
            self._rebuild()
        feed.batches = iter(self.reader)
        feed.error = None
        rebuilds_in_a_row = 0
        finished = False
        try:
            while True:
                try:
                    (images,) = self._pipeline.run()
                except StopIteration:
                    finished = True
                    return
                except RuntimeError as error:
                    if feed.error is not None:  # the reader failed (e.g. only unreadable files), not DALI
                        raise feed.error from error
                    rebuilds_in_a_row += 1
                    if rebuilds_in_a_row > MAX_REBUILDS_IN_A_ROW:
                        raise RuntimeError(f"DALI failed {rebuilds_in_a_row} times in a row without a batch coming out, "
                                           f"each time after replacing the files it could not decode; last error: "
                                           f"{error}") from error
                    self._recover(error)
                    continue
                rebuilds_in_a_row = 0
                batch = feed.in_flight.popleft()
                self.reader.report(batch)
                yield self._to_torch(images)
        finally:
            feed.batches.close()
            if finished:
                self._pipeline.reset()  # rewinds the external source for the next epoch
            else:
                feed.in_flight.clear()
                feed.replay.clear()
                self._pipeline = None  # left mid-epoch: a fresh pipeline next time

    # --- pipeline ----------------------------------------------------------------------------
    def _decoder_device(self) -> str:
        return "mixed" if self.device_id is not None else "cpu"

    def _decoder_options(self) -> dict:
        import nvidia.dali.types as types

        options = dict(device=self._decoder_device(), output_type=types.RGB, adjust_orientation=False)
        if self.device_id is not None:
            options.update(hw_decoder_load=self.hw_decoder_load,
                           preallocate_width_hint=PREALLOCATE_WIDTH, preallocate_height_hint=PREALLOCATE_HEIGHT)
        return options

    def _build_pipeline(self):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        # The graph function sees locals only: a pipeline that referred to the loader would make a
        # reference cycle (see BatchFeed).
        size, feed, decode_only, decoder_options = self.cfg.input_size, self._feed, self.decode_only, self._decoder_options()

        @pipeline_def(batch_size=self.cfg.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=self.prefetch_queue_depth, seed=self.cfg.seed)
        def augment():
            if decode_only:
                files = fn.external_source(source=lambda: feed()[0], batch=True)
                images = fn.decoders.image(files, **decoder_options)
                # one output shape per batch: resize without a crop (decode cost dominates)
                images = fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=False)
                return fn.transpose(images, perm=[2, 0, 1])
            # decode only the crop window (nvJPEG ROI decoding), then as torchvision's resized_crop
            files, anchors, shapes, flips = fn.external_source(source=feed, num_outputs=4, batch=True)
            images = fn.decoders.image_slice(files, anchors, shapes, axis_names="WH", normalized_anchor=False,
                                             normalized_shape=False, **decoder_options)
            images = fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop_mirror_normalize(
                images, mirror=flips, dtype=types.FLOAT, output_layout="CHW",
                mean=[255.0 * m for m in IMAGENET_MEAN], std=[255.0 * s for s in IMAGENET_STD],
            )

        pipeline = augment()
        pipeline.build()
        return pipeline

    def _rebuild(self) -> None:
        self._pipeline = None  # free the old pipeline's buffers and threads first
        self._pipeline = self._build_pipeline()
        self.pipeline_builds += 1

    def _recover(self, error: RuntimeError) -> None:
        """A batch failed inside DALI: replace its undecodable files, then rebuild and feed again."""
        feed = self._feed
        if not feed.in_flight:
            raise error
        failed = feed.in_flight.popleft()
        bad_rows = [row for row in range(len(failed)) if not self._decodes_alone(failed.files[row])]
        if not bad_rows:
            raise RuntimeError(f"DALI failed on a batch whose files all decode one by one: {error}") from error
        repaired = self.reader.replan(failed, bad_rows, reason="DALI cannot decode it")
        names = ", ".join(self.reader.source.name(failed.items[row]) for row in bad_rows[:5])
        warnings.warn(f"DALI could not decode {len(bad_rows)} file(s) ({names}); replaced them and rebuilt the pipeline",
                      stacklevel=3)
        # the repaired batch first, then those queued behind it, in their order
        feed.replay.extendleft(reversed([repaired, *feed.in_flight, *feed.replay]))
        feed.in_flight.clear()
        self._rebuild()

    def _decodes_alone(self, file: np.ndarray) -> bool:
        """Whether DALI's decoder (same device kind) decodes this one file."""
        import nvidia.dali.fn as fn
        from nvidia.dali import pipeline_def

        if self._probe is None:
            decoder_options = self._decoder_options()  # a local: no reference from the pipeline to the loader

            @pipeline_def(batch_size=1, num_threads=1, device_id=self.device_id, prefetch_queue_depth=1)
            def probe():
                encoded = fn.external_source(name="encoded")
                return fn.decoders.image(encoded, **decoder_options)

            self._probe = probe()
            self._probe.build()
        try:
            self._probe.feed_input("encoded", [file])
            self._probe.run()
            return True
        except RuntimeError:
            self._probe = None  # an error may leave the pipeline unusable
            return False

    def _to_torch(self, images) -> torch.Tensor:
        """DALI's output batch -> a torch tensor that owns its memory (DALI reuses its buffers)."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = images.as_tensor()
        dtype = torch.uint8 if self.decode_only else torch.float32
        out = torch.empty(dense.shape(), dtype=dtype, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        return out
