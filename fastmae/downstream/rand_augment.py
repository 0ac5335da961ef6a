"""RandAugment as the reference's fine-tuning runs it: timm's ``rand_augment_transform`` for
``--aa rand-m9-mstd0.5-inc1``, written again on PIL alone (timm and torchvision need a CUDA torch here).

Per image: ``n`` operations drawn with replacement from the 15 below (uniformly), each applied
with probability ``p`` (0.5) at a magnitude drawn from N(m, mstd), clipped to [0, mmax] (mmax 10).
The ``inc1`` list uses the "increasing" variants, whose distortion grows with the magnitude.
Constants are timm's: rotate up to 30 degrees, shear up to 0.3, translate up to 45% of the side,
fill with the ImageNet mean as uint8 (124, 116, 104), bicubic resampling (the reference's
``interpolation='bicubic'``). Random draws come from a numpy Generator, not Python's ``random``,
so a DataLoader worker's seed fixes them.

Config string, as timm parses it: ``rand`` then ``-``-separated sections ``m<int>`` (magnitude),
``n<int>`` (operations per image), ``mstd<float>`` (magnitude noise; > 100: uniform in [0, m]),
``mmax<int>``, ``inc<0|1>``, ``p<float>``. timm's weighted op choice (``w``) is not implemented.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes are in [0, 10]
IMAGENET_MEAN_UINT8 = (124, 116, 104)  # timm: tuple(min(255, round(255 * x)) for x in the ImageNet mean)
TRANSLATE_FRACTION = 0.45  # timm's translate_pct for the relative translations
RESAMPLE = Image.Resampling.BICUBIC

PLAIN_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
             "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
REFERENCE_CONFIG = "rand-m9-mstd0.5-inc1"  # main_finetune.py's --aa default
NO_AUGMENT = ("", "none")  # --aa values that turn RandAugment off


def _affine(img: Image.Image, coefficients: tuple) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coefficients, resample=RESAMPLE,
                         fillcolor=IMAGENET_MEAN_UINT8)


def _solarize_add(img: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep the top ``bits`` bits. 0 bits (PosterizeIncreasing at magnitude 10) makes the image black,
    as PIL's posterize did when the reference ran; recent Pillow refuses 0."""
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - bits) - 1)
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


# name -> PIL operation (image, *level arguments)
OPERATIONS: dict[str, Callable[..., Image.Image]] = {
    "AutoContrast": lambda img: ImageOps.autocontrast(img),
    "Equalize": lambda img: ImageOps.equalize(img),
    "Invert": lambda img: ImageOps.invert(img),
    "Rotate": lambda img, degrees: img.rotate(degrees, resample=RESAMPLE, fillcolor=IMAGENET_MEAN_UINT8),
    "Posterize": _posterize,
    "PosterizeIncreasing": _posterize,
    "Solarize": lambda img, threshold: ImageOps.solarize(img, threshold),
    "SolarizeIncreasing": lambda img, threshold: ImageOps.solarize(img, threshold),
    "SolarizeAdd": _solarize_add,
    "Color": lambda img, factor: ImageEnhance.Color(img).enhance(factor),
    "ColorIncreasing": lambda img, factor: ImageEnhance.Color(img).enhance(factor),
    "Contrast": lambda img, factor: ImageEnhance.Contrast(img).enhance(factor),
    "ContrastIncreasing": lambda img, factor: ImageEnhance.Contrast(img).enhance(factor),
    "Brightness": lambda img, factor: ImageEnhance.Brightness(img).enhance(factor),
    "BrightnessIncreasing": lambda img, factor: ImageEnhance.Brightness(img).enhance(factor),
    "Sharpness": lambda img, factor: ImageEnhance.Sharpness(img).enhance(factor),
    "SharpnessIncreasing": lambda img, factor: ImageEnhance.Sharpness(img).enhance(factor),
    "ShearX": lambda img, factor: _affine(img, (1, factor, 0, 0, 1, 0)),
    "ShearY": lambda img, factor: _affine(img, (1, 0, 0, factor, 1, 0)),
    "TranslateXRel": lambda img, fraction: _affine(img, (1, 0, fraction * img.size[0], 0, 1, 0)),
    "TranslateYRel": lambda img, fraction: _affine(img, (1, 0, 0, 0, 1, fraction * img.size[1])),
}


def level_arguments(name: str, magnitude: float, rng: np.random.Generator) -> tuple:
    """An operation's arguments at ``magnitude`` in [0, 10] (timm's LEVEL_TO_ARG); signed ones get a
    random sign."""
    fraction = magnitude / MAX_LEVEL

    def signed(value: float) -> float:
        return -value if rng.random() > 0.5 else value

    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":
        return (signed(fraction * 30.0),)
    if name == "Posterize":
        return (int(fraction * 4),)
    if name == "PosterizeIncreasing":
        return (4 - int(fraction * 4),)
    if name == "Solarize":
        return (int(fraction * 256),)
    if name == "SolarizeIncreasing":
        return (256 - int(fraction * 256),)
    if name == "SolarizeAdd":
        return (int(fraction * 110),)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (fraction * 1.8 + 0.1,)
    if name.endswith("Increasing"):  # Color/Contrast/Brightness/SharpnessIncreasing
        return (max(0.1, 1.0 + signed(fraction * 0.9)),)
    if name in ("ShearX", "ShearY"):
        return (signed(fraction * 0.3),)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (signed(fraction * TRANSLATE_FRACTION),)
    raise ValueError(f"unknown RandAugment operation {name!r}")


@dataclass(frozen=True)
class RandAugment:
    """PIL RGB image -> PIL RGB image, ``num_ops`` random operations at about ``magnitude``."""

    magnitude: float = 10.0
    num_ops: int = 2
    magnitude_std: float = 0.0  # inf: uniform in [0, magnitude]
    magnitude_max: float = MAX_LEVEL
    increasing: bool = False
    prob: float = 0.5

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else PLAIN_OPS

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for name in rng.choice(self.ops, self.num_ops, replace=True):
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            magnitude = self.magnitude
            if self.magnitude_std == math.inf:
                magnitude = rng.uniform(0.0, magnitude)
            elif self.magnitude_std > 0:
                magnitude = rng.normal(magnitude, self.magnitude_std)
            magnitude = max(0.0, min(magnitude, self.magnitude_max))
            img = OPERATIONS[name](img, *level_arguments(name, magnitude, rng))
        return img


# timm's config sections: key -> (RandAugment field, the value read from the text after the key)
CONFIG_SECTIONS = {
    "m": ("magnitude", lambda text: float(int(text))),
    "n": ("num_ops", int),
    "mstd": ("magnitude_std", lambda text: math.inf if float(text) > 100 else float(text)),  # > 100: uniform
    "mmax": ("magnitude_max", lambda text: float(int(text))),
    "inc": ("increasing", lambda text: int(text) != 0),
    "p": ("prob", float),
}


def parse_rand_augment(config: str | None) -> RandAugment | None:
    """``--aa`` -> RandAugment, or None for '' / 'none'; a ValueError that names what is wrong otherwise."""
    if config is None or config.strip().lower() in NO_AUGMENT:
        return None
    sections = config.strip().split("-")
    if sections[0] != "rand":
        raise ValueError(f"--aa {config!r}: only RandAugment configs ('rand-m9-mstd0.5-inc1', 'rand-m7-n3', ...) "
                         f"or 'none' are supported; timm's AutoAugment and AugMix policies are not")
    settings = {}
    for section in sections[1:]:
        key, value = re.match(r"([a-z]*)(.*)", section).groups()
        if key not in CONFIG_SECTIONS:
            raise ValueError(f"--aa {config!r}: unknown section {section!r} (known: m<int>, n<int>, "
                             f"mstd<float>, mmax<int>, inc<0|1>, p<float>; timm's op weights 'w' are not supported)")
        setting, read = CONFIG_SECTIONS[key]
        try:
            settings[setting] = read(value)
        except ValueError:
            raise ValueError(f"--aa {config!r}: section {section!r} needs a number after {key!r}") from None
    augment = RandAugment(**settings)
    if augment.num_ops < 1 or not 0.0 <= augment.prob <= 1.0 or augment.magnitude < 0 or augment.magnitude_std < 0:
        raise ValueError(f"--aa {config!r}: n must be >= 1, p in [0, 1], m and mstd >= 0")
    return augment
