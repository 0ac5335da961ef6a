"""Tar shards as an image source: webdataset-style .tar files of images (``key.jpg`` next to
``key.cls`` and the like; members that are not images are ignored), for datasets too large for a
folder tree. A sample with an image field of its own (``key.jpg``) is that one image: its other image
fields (``key.seg.png``, ``key.depth.png``) are not photographs of their own. Hidden names (macOS's
``._*`` copies, members or shards) are passed over, as webdataset and the folder source do; a shard
cut short, empty, or linked to nothing is named in a warning with what of it is read.

``--data_path`` may name one .tar file or a folder (or its ``train/``) holding .tar files. The
member table (shard, byte offset, size) is read once from the tar headers; an item is then one
``pread`` from its shard, so every loader uses tar shards as it uses a folder: a fresh global
shuffle each epoch, split across ranks by ``sources.shard_indices`` (every rank reads its disjoint
share of the members, from any shard).
"""

from __future__ import annotations

import io
import os
import re
import tarfile  # writing shards only; reading scans headers directly
import warnings
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from fastmae.data.sources import IMAGE_EXTENSIONS, as_rgb


def list_tar_shards(data_path: str | os.PathLike) -> list[Path]:
    """The .tar files ``data_path`` names (itself, or those in it or its ``train/``); [] if none."""
    root = Path(data_path).expanduser()
    if root.is_file():
        return [root] if root.suffix.lower() == ".tar" else []
    if (root / "train").is_dir():
        root = root / "train"
    if not root.is_dir():
        return []
    named = sorted(path for path in root.iterdir() if path.suffix.lower() == ".tar" and not path.name.startswith("."))
    dangling = [path for path in named if not path.exists()]
    if dangling:  # a shard linked from a store that moved: fewer images, said
        warnings.warn(f"{len(dangling)} .tar shard link(s) in {root} lead to nothing (e.g. {dangling[0]} -> "
                      f"{os.readlink(dangling[0])}); they are passed over", stacklevel=2)
    return [path for path in named if path.is_file()]


# what a compressed shard ends in: read by offset, shards must be uncompressed .tar
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tzst")


def is_compressed_tar(path: Path) -> bool:
    return path.name.lower().endswith(COMPRESSED_TAR_SUFFIXES)


def compressed_tar_message(path: Path) -> str:
    return (f"{path} is a compressed tar: fastmae reads tar shards by byte offset, so they must be uncompressed "
            "(.tar); decompress them (e.g. gunzip for .tar.gz / .tgz) and point --data_path at the .tar files")


TAR_BLOCK = 512
USTAR_MAGIC = b"ustar\x00"  # POSIX ustar: the name may continue in the prefix field
REGULAR_FILE_TYPES = (b"0", b"\x00", b"7")


class TarScan(NamedTuple):
    members: list[tuple[int, int, str]]  # (data offset, size, name) of each whole regular file
    complete: bool  # False: the file ends before its end-of-archive blocks (cut short, or empty)


def scan_tar_members(path: str | os.PathLike) -> TarScan:
    """(data offset, size, name) of every regular file in an uncompressed tar, from its 512-byte
    headers alone (about 10x faster than ``tarfile``, which matters for a million members), and
    whether the tar is whole. Understands ustar prefixes, GNU long names and pax ``path`` records;
    a ValueError for anything that is not an uncompressed tar."""
    members = []
    long_name: bytes | None = None
    with open(path, "rb") as file:
        descriptor, end = file.fileno(), os.fstat(file.fileno()).st_size
        offset = 0
        while True:
            if offset + TAR_BLOCK > end:  # no end-of-archive blocks: the copy stopped here
                return TarScan(members, complete=False)
            header = os.pread(descriptor, TAR_BLOCK, offset)
            if header.count(0) == TAR_BLOCK:  # end-of-archive blocks
                return TarScan(members, complete=True)
            stored_checksum = header[148:156].split(b"\x00")[0].strip()
            # the checksum counts its own 8 bytes as spaces; one that is not octal digits is no tar's
            if (not re.fullmatch(rb"[0-7]+", stored_checksum)
                    or int(stored_checksum, 8) != sum(header) - sum(header[148:156]) + 8 * 32):
                raise ValueError(f"{path} is not an uncompressed tar file (bad header at byte {offset})")
            size = _tar_number(header[124:136])
            kind = header[156:157]
            data_offset = offset + TAR_BLOCK
            if data_offset + size > end:  # a member the copy cut through: not an image any more
                return TarScan(members, complete=False)
            if kind == b"L":  # GNU: the next member's long name
                long_name = os.pread(descriptor, size, data_offset).rstrip(b"\x00")
            elif kind == b"x":  # pax extended header: "length key=value\n" records
                for record in os.pread(descriptor, size, data_offset).split(b"\n"):
                    key_value = record.partition(b" ")[2]
                    if key_value.startswith(b"path="):
                        long_name = key_value[len(b"path="):]
            else:
                if kind in REGULAR_FILE_TYPES:
                    name = header[:100].split(b"\x00")[0]
                    if header[257:263] == USTAR_MAGIC and header[345] != 0:
                        name = header[345:500].split(b"\x00")[0] + b"/" + name
                    name = long_name if long_name is not None else name
                    members.append((data_offset, size, name.decode("utf-8", "surrogateescape")))
                long_name = None
            offset = data_offset + -(-size // TAR_BLOCK) * TAR_BLOCK


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\x00")[0].strip()
    return int(digits, 8) if digits else 0


def sample_images(members: list[tuple[int, int, str]]) -> tuple[list[tuple[int, int, str]], list[str]]:
    """-> (the members that are a sample's image, the names of second images passed over). A sample is
    a run of members with one key (webdataset's: the path up to the first dot of the file name); one
    with an image field of its own (``key.jpg``) is that image. Other runs keep every image member, so
    a plain tar of ``photo.2019.jpg``, ``photo.2020.jpg`` loses nothing."""
    images, passed_over, start = [], [], 0
    while start < len(members):
        key = _sample_key(members[start][2])
        stop = start + 1
        while stop < len(members) and _sample_key(members[stop][2]) == key:
            stop += 1
        sample = [m for m in members[start:stop] if _is_image_member(m[2])]
        plain = [m for m in sample if "." not in _field(m[2])]
        if len(plain) == 1:
            images += plain
            passed_over += [m[2] for m in sample if m is not plain[0]]
        else:
            images += sample
        start = stop
    return images, passed_over


def _is_image_member(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not Path(name).name.startswith(".")


def _sample_key(name: str) -> str:
    folder, _, file_name = name.rpartition("/")
    return f"{folder}/{file_name.split('.', 1)[0]}"


def _field(name: str) -> str:
    """What follows the key: ``jpg`` for ``000001.jpg``, ``seg.png`` for ``000001.seg.png``."""
    return name.rpartition("/")[2].partition(".")[2]


class TarShards:
    """Image members of tar files, read by offset (no extraction)."""

    def __init__(self, shard_paths: list[Path]):
        if not shard_paths:
            raise ValueError("no .tar shards given")
        self.shard_paths = [Path(path) for path in shard_paths]
        self.members: list[tuple[int, int, int, str]] = []  # (shard, data offset, size, member name)
        cut_short, second_images = [], []
        for shard, path in enumerate(self.shard_paths):
            scan = scan_tar_members(path)
            images, passed_over = sample_images(scan.members)
            self.members += [(shard, offset, size, name) for offset, size, name in images]
            second_images += passed_over
            if not scan.complete:
                cut_short.append(f"{path} ({'empty' if path.stat().st_size == 0 else 'cut short'}: "
                                 f"{len(images)} image(s) read before its end)")
        if cut_short:
            warnings.warn(f"{len(cut_short)} tar shard(s) end without a tar's end-of-archive blocks, as a copy cut "
                          f"short does (images after the cut would be missing; some writers omit the blocks): "
                          f"{'; '.join(cut_short[:3])}", stacklevel=3)
        if second_images:
            warnings.warn(f"{len(second_images)} tar member(s) are a sample's second image (e.g. {second_images[0]}) "
                          "beside its own key.jpg / key.png: one image per sample is read", stacklevel=3)
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
            return as_rgb(image)

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
