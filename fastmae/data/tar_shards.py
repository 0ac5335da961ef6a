"""Tar shards as an image source: webdataset-style .tar files of images (``key.jpg`` next to
``key.cls`` and the like; members that are not images are ignored), for datasets too large for a
folder tree.

``--data_path`` may name one .tar file or a folder (or its ``train/``) holding .tar files. The
member table (shard, byte offset, size) is read once from the tar headers; an item is then one
``pread`` from its shard, so every loader uses tar shards as it uses a folder: a fresh global
shuffle each epoch, split across ranks by ``sources.shard_indices`` (every rank reads its disjoint
share of the members, from any shard).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from PIL import Image

from fastmae.data.sources import IMAGE_EXTENSIONS


def list_tar_shards(data_path: str | os.PathLike) -> list[Path]:
    """The .tar files ``data_path`` names (itself, or those in it or its ``train/``); [] if none."""
    root = Path(data_path).expanduser()
    if root.is_file():
        return [root] if root.suffix.lower() == ".tar" else []
    if (root / "train").is_dir():
        root = root / "train"
    if not root.is_dir():
        return []
    return sorted(path for path in root.iterdir() if path.suffix.lower() == ".tar" and path.is_file())


class TarShards:
    """Image members of tar files, read by offset (no extraction)."""

    def __init__(self, shard_paths: list[Path]):
        if not shard_paths:
            raise ValueError("no .tar shards given")
        self.shard_paths = [Path(path) for path in shard_paths]
        self.members: list[tuple[int, int, int, str]] = []  # (shard, data offset, size, member name)
        for shard, path in enumerate(self.shard_paths):
            try:
                with tarfile.open(path, "r:") as tar:  # "r:": uncompressed only; offsets must be file offsets
                    for member in tar:
                        if member.isfile() and Path(member.name).suffix.lower() in IMAGE_EXTENSIONS:
                            self.members.append((shard, member.offset_data, member.size, member.name))
            except tarfile.TarError as error:
                raise ValueError(f"{path} is not an uncompressed tar file: {error}") from None
        if not self.members:
            raise ValueError(f"the tar shards {[str(p) for p in self.shard_paths[:3]]}... hold no image files "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        self._files: dict[int, int] = {}  # shard -> descriptor, opened lazily in each process

    def __len__(self) -> int:
        return len(self.members)

    def read_bytes(self, index: int) -> bytes:
        shard, offset, size, _ = self.members[index]
        descriptor = self._files.get(shard)
        if descriptor is None:
            descriptor = self._files[shard] = os.open(self.shard_paths[shard], os.O_RDONLY)
        data = os.pread(descriptor, size, offset)  # positionless: safe from threads and forked workers
        if len(data) != size:
            raise OSError(f"{self.name(index)}: shard ends {size - len(data)} bytes early")
        return data

    def load(self, index: int) -> Image.Image:
        with Image.open(io.BytesIO(self.read_bytes(index))) as image:
            return image.convert("RGB")

    def name(self, index: int) -> str:
        shard, _, _, member = self.members[index]
        return f"{self.shard_paths[shard]}:{member}"

    def __getstate__(self) -> dict:  # worker processes open their own descriptors
        return {**self.__dict__, "_files": {}}

    def __del__(self):
        for descriptor in getattr(self, "_files", {}).values():
            try:
                os.close(descriptor)
            except OSError:
                pass


def write_tar_shards(image_paths: list[Path], out_dir: str | os.PathLike, images_per_shard: int) -> list[Path]:
    """Pack image files into webdataset-style shards ``shard-000000.tar``... (key = running number)."""
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(image_paths), images_per_shard):
        shard = out_dir / f"shard-{len(shards):06d}.tar"
        with tarfile.open(shard, "w") as tar:
            for key, path in enumerate(image_paths[start : start + images_per_shard], start):
                tar.add(path, arcname=f"{key:09d}{Path(path).suffix.lower()}")
        shards.append(shard)
    return shards
