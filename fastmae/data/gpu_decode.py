"""The torchvision loader: batched nvJPEG decoding with ``torchvision.io.decode_jpeg(device="cuda")``,
then the crop, bicubic resize, flip and normalisation on the GPU. For machines with torchvision
but no DALI; CUDA only.

Files, crop boxes and flips come from ``encoded_batches.EncodedBatchReader`` (the CPU loader's
shuffle, shard and random draws). A background thread decodes and augments each batch on its own
CUDA stream, a few batches ahead, so decoding overlaps the training step; the training stream
waits on an event before it uses a batch.

Routing of unusual files: grayscale JPEGs decode on the GPU to RGB; CMYK/YCCK JPEGs (which nvJPEG
does not convert like libjpeg) and non-JPEG files (PNG, ...) decode on the CPU with PIL. If the
batched GPU call fails, the batch is decoded image by image, a failing image again on the CPU, and
an image nothing decodes is replaced by the next item (counted in ``skipped``).

torchvision is imported when the loader is built, never at module import: it does not import
with the CPU-only torch of the development machines.
"""

from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastmae.data.augment import IMAGENET_MEAN, IMAGENET_STD, crop_table, normalize, resized_crops
from fastmae.data.encoded_batches import EncodedBatch, EncodedBatchReader, ReaderBackedBatches, run_ahead
from fastmae.data.loader import DataConfig, hand_over
from fastmae.data.sources import as_rgb, open_source

MAX_REPLANS_PER_BATCH = 8


def build_torchvision_loader(cfg: DataConfig, rank: int, world_size: int, device: torch.device,
                             **options) -> "TorchvisionGPULoader":
    return TorchvisionGPULoader(cfg, rank, world_size, device, **options)


def decode_on_cpu(file: np.ndarray) -> torch.Tensor:
    """uint8 [num_bytes] -> uint8 [3, H, W] with PIL (any format and colour space)."""
    with Image.open(io.BytesIO(file.tobytes())) as image:
        pixels = np.array(as_rgb(image))  # writable, for torch.from_numpy
    return torch.from_numpy(pixels).permute(2, 0, 1)


class TorchvisionGPULoader(ReaderBackedBatches):
    """``ImageBatches`` decoded by torchvision's nvJPEG: float32 [B, 3, S, S] on a CUDA ``device``."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, device: torch.device, *,
                 num_io_threads: int = 8, prefetch_batches: int = 3, decode_only: bool = False):
        import torchvision.io  # noqa: F401  (fail here, with the package's name, if it is missing)

        if cfg.data_path is None:
            raise ValueError("the torchvision loader reads files: give --data_path (the embedded photographs need the cpu loader)")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"the torchvision loader decodes on a CUDA device, not {self.device}; use --data_loader cpu or dali")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cfg = cfg
        self.prefetch_batches = max(1, prefetch_batches)
        self.decode_only = decode_only  # benchmarks: decode, then a plain resize to batch them
        self.reader = EncodedBatchReader(open_source(cfg.data_path), cfg, rank, world_size,
                                         num_io_threads=num_io_threads, prefetch_batches=prefetch_batches + 1)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for images, event, batch in run_ahead(self._decoded_batches(), self.prefetch_batches, name="fastmae-gpu-decode"):
            images = hand_over(images, event, torch.cuda.current_stream(self.device))
            self.reader.report(batch)
            yield images

    # --- on the decode thread and stream ---------------------------------------------------------
    def _decoded_batches(self) -> Iterator[tuple[torch.Tensor, torch.cuda.Event, EncodedBatch]]:
        """(float32 [B, 3, S, S] normalised, event marking it ready, its batch), made on a side stream."""
        stream = torch.cuda.Stream(self.device)
        batches = iter(self.reader)
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                for batch in batches:
                    images, batch = self._augment(batch)
                    event = torch.cuda.Event()
                    event.record(stream)
                    yield images, event, batch
        finally:
            batches.close()

    def _augment(self, batch: EncodedBatch) -> tuple[torch.Tensor, EncodedBatch]:
        """-> (float32 [B, 3, S, S] normalised, on the decode stream; the batch with undecodable
        files replaced, whose ``skipped`` the consumer reports)."""
        for _ in range(MAX_REPLANS_PER_BATCH):
            images, bad_rows = self._decode(batch)
            if not bad_rows:
                break
            batch = self.reader.replan(batch, bad_rows, reason="neither nvJPEG nor PIL decodes it")
        else:
            first = [passed[0] for passed in batch.skipped[:3]]
            raise RuntimeError(f"{MAX_REPLANS_PER_BATCH} rounds of undecodable files in one batch: {first}")
        size = self.cfg.input_size
        if self.decode_only:
            pixels = torch.stack([F.interpolate(image[None].float(), size=(size, size), mode="nearest")[0]
                                  for image in images]).to(torch.uint8)
            return normalize(pixels, IMAGENET_MEAN, IMAGENET_STD), batch
        flat = torch.cat([image.reshape(-1) for image in images])  # one buffer: the batch's crops in two launches
        table = crop_table([image.shape[1:] for image in images], batch.boxes, batch.flips, size)
        return resized_crops(flat, table, size, IMAGENET_MEAN, IMAGENET_STD), batch

    def _decode(self, batch: EncodedBatch) -> tuple[list[torch.Tensor | None], list[int]]:
        """-> (B x uint8 [3, H, W] on the GPU, rows nothing could decode)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        on_gpu = [row for row, header in enumerate(batch.headers) if header.format == "jpeg" and header.channels in (1, 3)]
        images: list[torch.Tensor | None] = [None] * len(batch)
        if on_gpu:
            if self.device.type == "cuda":  # (tests drive this method on the CPU)
                # decode_jpeg writes on its own stream into memory allocated on ours: let ours drain first
                torch.cuda.current_stream(self.device).synchronize()
            encoded = [torch.from_numpy(batch.files[row].copy()) for row in on_gpu]
            try:
                decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one bad file fails the batched call: go image by image
                decoded = []
                for data in encoded:
                    try:
                        decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        decoded.append(None)
            for row, image in zip(on_gpu, decoded):
                images[row] = image
        bad_rows = []
        for row in range(len(batch)):
            if images[row] is not None and images[row].shape[0] == 3:
                continue
            try:
                images[row] = decode_on_cpu(batch.files[row]).to(self.device, non_blocking=False)
            except (OSError, ValueError, SyntaxError):
                bad_rows.append(row)
        # a decoded size that differs from the header's would misplace the crop box
        for row, image in enumerate(images):
            if image is not None and row not in bad_rows:
                header = batch.headers[row]
                if tuple(image.shape[1:]) != (header.height, header.width):
                    bad_rows.append(row)
        return images, bad_rows
