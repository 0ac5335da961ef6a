"""Where images come from, and which of them each rank reads in an epoch.

A source is an indexable collection of images (``len(source)``, ``source.load(i) -> PIL.Image``,
``source.name(i)``). ``open_source`` picks one for ``--data_path``: an image folder (the reference
ImageFolder layout ``train/<class>/*``, ``<class>/*``, or a flat folder), or the embedded
photographs when no path is given. ``shard_indices`` is the per-epoch shuffle and rank split, the
same as ``torch.utils.data.DistributedSampler`` (pad by wrapping, then every world_size-th item).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

# torchvision's ImageFolder extensions (the reference dataset)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# PIL's integer grey modes wider than 8 bits (a 16-bit grey PNG opens as "I;16")
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def as_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB, 8 bits a channel. PIL's ``convert("RGB")`` clips 16-bit grey at 255, which
    turns almost every pixel white; it is scaled to 8 bits here (v / 257, rounded), as GPU decoders do."""
    if image.mode in WIDE_GREY_MODES:
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


class ImageSource(Protocol):
    def __len__(self) -> int: ...
    def load(self, index: int) -> Image.Image: ...  # raises on an unreadable item
    def name(self, index: int) -> str: ...  # for messages about unreadable items


def list_image_files(data_path: str | os.PathLike, train_split: bool = True) -> list[Path]:
    """Image files under ``data_path`` (or its ``train/`` folder, unless ``train_split`` is False: a
    folder of images to look at, not a dataset), sorted; recursive, so class sub-folders and flat
    folders both work. A missing or image-less folder is a ValueError."""
    root = Path(data_path).expanduser()
    if not root.exists():
        raise ValueError(f"--data_path {root} does not exist")
    from fastmae.data.tar_shards import compressed_tar_message, is_compressed_tar  # it imports this module

    if not root.is_dir():
        if is_compressed_tar(root):
            raise ValueError(f"--data_path {compressed_tar_message(root)}")
        raise ValueError(f"--data_path {root} is not a folder")
    if train_split and (root / "train").is_dir():  # the reference reads os.path.join(data_path, 'train')
        root = root / "train"
    walked = list(_walk_files(root))
    named = [path for path in walked if _is_image_name(path)]
    files = sorted(path for path in named if path.is_file())
    # links whose target is gone (a moved dataset a subset was linked from): named, not silently fewer images
    dangling = sorted(path for path in named if path.is_symlink() and not path.exists())
    broken = (f"{len(dangling)} image link(s) below it lead to nothing (e.g. {dangling[0]} -> "
              f"{os.readlink(dangling[0])})" if dangling else "")
    if not files:
        nested_tar = next((path for path in walked if path.suffix.lower() == ".tar"), None)
        compressed = next((path for path in walked if is_compressed_tar(path)), None)
        hint = (f"; it holds .tar shards in a sub-folder ({nested_tar.relative_to(root)}): give the folder that "
                "holds them" if nested_tar is not None
                else f"; {compressed_tar_message(compressed)}" if compressed is not None
                else f"; {broken}" if broken else "")
        raise ValueError(f"--data_path {root} holds no image files ({', '.join(IMAGE_EXTENSIONS)}){hint}")
    if dangling:
        warnings.warn(f"--data_path {root}: {broken}; they are passed over", stacklevel=2)
    return files


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _walk_files(root: Path):
    """Every file below ``root``, into symlinked folders too, as torchvision's ImageFolder goes (class
    folders linked in from elsewhere are a common way to build a subset). A link to a folder that
    contains it is not entered: it would loop."""
    real_ancestors = {Path(root): (os.path.realpath(root),)}
    for folder, subfolders, names in os.walk(root, followlinks=True):
        ancestors = real_ancestors.pop(Path(folder))
        kept = []
        for name in subfolders:
            real = os.path.realpath(os.path.join(folder, name))
            if real not in ancestors:
                kept.append(name)
                real_ancestors[Path(folder, name)] = (*ancestors, real)
        subfolders[:] = kept
        yield from (Path(folder, name) for name in names)


class ImageFiles:
    """Image files decoded with PIL."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as image:
            return as_rgb(image)

    def name(self, index: int) -> str:
        return str(self.paths[index])


def refuse_empty_data_path(data_path: str | os.PathLike, flag: str = "--data_path") -> None:
    """``--data_path ""`` (a script's unset variable) would be the current folder: every image below it."""
    if isinstance(data_path, str) and not data_path.strip():
        raise ValueError(f"{flag} is empty ({data_path!r}; an unset variable in a script?): give the image folder")


def open_source(data_path: str | os.PathLike | None, samples_per_epoch: int | None = None) -> ImageSource:
    """The source for ``--data_path``; None means the embedded photographs."""
    if data_path is None:
        from fastmae.data.embedded import EmbeddedPhotos

        return EmbeddedPhotos(samples_per_epoch=samples_per_epoch)
    refuse_empty_data_path(data_path)
    # Other source kinds (e.g. tar shards) are recognised here, before the folder listing.
    # --- tar shards (fastmae.data.tar_shards): one .tar, or a folder of .tar files ---
    from fastmae.data.tar_shards import TarShards, list_tar_shards

    tar_paths = list_tar_shards(data_path)
    if tar_paths:
        folder = tar_paths[0].parent
        loose = (next((path for path in _walk_files(folder) if _is_image_name(path)), None)
                 if Path(data_path).expanduser().is_dir() else None)  # a .tar named alone is read alone
        if loose is not None:  # one kind is read, and the other would be left out without a word
            raise ValueError(f"--data_path {data_path} holds both .tar shards ({len(tar_paths)}, e.g. "
                             f"{tar_paths[0].name}) and image files (e.g. {loose.relative_to(folder)}): "
                             "give a folder of one kind")
        return TarShards(tar_paths)
    # --- end tar shards ---
    return ImageFiles(list_image_files(data_path))


def shard_indices(num_items: int, epoch: int, seed: int, rank: int, world_size: int,
                  shuffle: bool = True) -> np.ndarray:
    """This rank's item indices for ``epoch``: disjoint across ranks (up to the wrap-around padding
    that makes every rank's share equal), a fresh permutation each epoch from (seed, epoch)."""
    if num_items <= 0:
        raise ValueError("cannot shard an empty source")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_items)
    else:
        order = np.arange(num_items)
    per_rank = -(-num_items // world_size)
    padding = per_rank * world_size - num_items
    if padding:
        order = np.concatenate([order, np.resize(order, padding)])
    return order[rank::world_size]
