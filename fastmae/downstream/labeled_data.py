"""Labelled images for classification: an ImageFolder (the class is the folder name) and the
reference's transforms, with PIL only (no torchvision).

    root/<class_a>/xxx.png, root/<class_b>/yyy.jpg, ...   classes sorted by name -> 0, 1, ...

Train: RandomResizedCrop(input_size, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic) + horizontal flip
(``fastmae.data.augment``, the pretraining loader's crop, with the classification scale range).
Eval: resize the shorter side to input_size / 0.875 (bicubic; above 224 px to input_size, the
reference's crop_pct 1.0), centre crop input_size. Images are
read as RGB (grey ones replicated) and normalised with the ImageNet mean/std. The reference's
linear probe uses exactly these; its fine-tuning adds RandAugment after the flip and random erasing
after the normalisation (``rand_augment``, ``random_erasing``), in timm's order.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from fastmae.data.augment import (IMAGENET_MEAN, IMAGENET_STD, normalize, random_resized_crop_flip, resize_center_crop,
                                  sample_resized_crop)
from fastmae.data.loader import UnreadableData, load_or_next, why_unreadable
from fastmae.data.sources import list_image_files, refuse_empty_data_path
from fastmae.downstream.rand_augment import RandAugment
from fastmae.downstream.random_erasing import RandomErasing

UNREADABLE = -1  # the label of an evaluation image that cannot be read: left out, and counted
CLASSIFY_CROP_SCALE = (0.08, 1.0)  # torchvision's default, used by the reference's linprobe/finetune
EVAL_CROP_FRACTION = 0.875  # 224 / 256, the reference's crop_pct up to 224 px (util/datasets.py); 1.0 above


def eval_crop_fraction(input_size: int) -> float:
    return EVAL_CROP_FRACTION if input_size <= 224 else 1.0


def list_labeled_images(root: str | os.PathLike) -> tuple[list[tuple[Path, int]], list[str]]:
    """-> ([(path, class index)], class names): one sub-folder per class, images at any depth below it."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
    samples = []
    for index, name in enumerate(classes):
        # every image below the class folder: one of its sub-folders named train/ is not a split
        samples.extend((path, index) for path in list_image_files(root / name, train_split=False))
    return samples, classes


@dataclass
class ClassificationTransform:
    """PIL image -> normalised float32 tensor [3, input_size, input_size]."""

    input_size: int
    train: bool
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    rand_augment: RandAugment | None = None  # train only
    random_erasing: RandomErasing | None = None  # train only
    # train only: torchvision's RandomResizedCrop draw (fine-tuning, timm's), or the reference linear
    # probe's clamped single draw (sample_clamped_resized_crop)
    sample_crop: Callable = sample_resized_crop
    _rng: np.random.Generator | None = field(default=None, repr=False)
    _rng_seed: int | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.input_size < 1:
            raise ValueError(f"input_size must be positive, got {self.input_size}")

    def rng(self) -> np.random.Generator:
        # called without a sample's own generator: one per DataLoader worker, seeded from the worker's torch seed
        seed = torch.initial_seed()
        if self._rng is None or self._rng_seed != seed:
            self._rng, self._rng_seed = np.random.default_rng(seed), seed
        return self._rng

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        """``rng``: the sample's own generator (see ``LabeledImageFolder``); default: this worker's."""
        size = self.input_size
        rng = rng if rng is not None else self.rng() if self.train else None
        if self.train:
            pixels = random_resized_crop_flip(img, size, rng, scale=CLASSIFY_CROP_SCALE, sample_box=self.sample_crop)
            if self.rand_augment is not None:
                pixels = np.array(self.rand_augment(Image.fromarray(pixels), rng), dtype=np.uint8)  # writable
        else:
            pixels = resize_center_crop(img, size, resize_to=int(size / eval_crop_fraction(size)))
        x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # uint8 [1, 3, S, S]
        x = normalize(x, self.mean, self.std)[0]
        if self.train and self.random_erasing is not None:
            x = self.random_erasing(x, rng)
        return x


class LabeledImageFolder(torch.utils.data.Dataset):
    """(image tensor [3, S, S], class index) pairs from ``root/<class>/<images>``.

    Indexed by the item, or by a sampler's key (item, epoch, position; ``fastmae.downstream.sharding``):
    then the augmentation is drawn from (seed, epoch, position) alone, whichever worker or process
    loads it.

    ``replace_unreadable``: a file that cannot be read is replaced by the next one (training); else
    (evaluation, where a copy of another image would be scored twice, under another's label) it is an
    empty image with the label ``UNREADABLE``, which ``evaluate`` leaves out and counts."""

    def __init__(self, root: str | os.PathLike, transform: ClassificationTransform,
                 classes: Sequence[str] | None = None, seed: int = 0, replace_unreadable: bool = True):
        self.root = Path(root)
        self.seed = seed
        self.replace_unreadable = replace_unreadable
        self.samples, found = list_labeled_images(root)
        if classes is not None and list(found) != list(classes):
            raise ValueError(f"{root} has classes {found}, expected {list(classes)} (as in the train folder)")
        self.classes = list(found)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        """A file that cannot be read is replaced by the next one (with its label) and named, as in
        pretraining: one broken file does not end a run after hours."""
        index, rng = key, None
        if isinstance(key, tuple):
            index, epoch, position = key
            rng = np.random.default_rng([self.seed, epoch, position])
        if not self.replace_unreadable:
            try:
                return self._load(index, rng)
            except Exception as error:
                path = str(self.samples[index][0])
                warnings.warn(f"unreadable image left out of the evaluation: {path} ({why_unreadable(error, path)})",
                              stacklevel=2)
                size = self.transform.input_size
                return torch.zeros(3, size, size), UNREADABLE
        sample, unreadable = load_or_next(lambda item: self._load(item, rng), lambda item: str(self.samples[item][0]),
                                          index, len(self))
        for skipped in unreadable:
            warnings.warn(f"skipped unreadable image, replaced by the next one: {skipped}", stacklevel=2)
        if sample is None:
            raise ValueError(str(UnreadableData(unreadable)))
        return sample

    def _load(self, index: int, rng: np.random.Generator | None) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as img:
            return self.transform(img, rng), label


def train_val_folders(data_path: str | os.PathLike) -> tuple[Path, Path]:
    """The reference layout: data_path/train and data_path/val."""
    refuse_empty_data_path(data_path)
    data_path = Path(data_path)
    train, val = data_path / "train", data_path / "val"
    for folder in (train, val):
        if not folder.is_dir():
            raise ValueError(f"expected {folder}: --data_path must hold train/ and val/ ImageFolders")
    return train, val


def build_datasets(data_path, input_size: int, train_augment: bool = True,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD, rand_augment: RandAugment | None = None,
                   random_erasing: RandomErasing | None = None, seed: int = 0,
                   sample_crop: Callable = sample_resized_crop) -> tuple[LabeledImageFolder, LabeledImageFolder]:
    """Train (augmented unless train_augment is False; ``seed`` for keyed items) and val datasets with
    the same classes."""
    train_dir, val_dir = train_val_folders(data_path)
    train = LabeledImageFolder(train_dir, ClassificationTransform(input_size, train_augment, mean, std, rand_augment,
                                                                  random_erasing, sample_crop), seed=seed)
    val = LabeledImageFolder(val_dir, ClassificationTransform(input_size, False, mean, std), train.classes,
                             replace_unreadable=False)
    return train, val
