"""The embedded default dataset: real photographs that ship inside the scikit-image wheel.

``fastmae pretrain`` without ``--data_path`` trains on these, randomly cropped by the usual
augmentation, so a first run needs no download. Only photographs are used (no drawings, logos,
text or synthetic phantoms); greyscale ones are repeated over the three channels. An "epoch" is
``samples_per_epoch`` crops, cycling over the photographs.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# skimage.data loaders of photographs that are files in the wheel (no pooch download).
PHOTO_LOADERS = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
    "motorcycle_left", "motorcycle_right", "camera", "coins", "moon", "brick", "grass", "gravel", "clock",
)
DEFAULT_SAMPLES_PER_EPOCH = 1024


def load_photos() -> dict[str, np.ndarray]:
    """name -> uint8 [H, W, 3] for every embedded photograph."""
    import skimage.data

    photos = {}
    for name in PHOTO_LOADERS:
        if name.startswith("motorcycle_"):  # the stereo pair comes as one call
            left, right, _ = skimage.data.stereo_motorcycle()
            pixels = left if name.endswith("left") else right
        else:
            pixels = getattr(skimage.data, name)()
        pixels = np.asarray(pixels)
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        photos[name] = np.ascontiguousarray(pixels[:, :, :3].astype(np.uint8))
    return photos


class EmbeddedPhotos:
    """An image source of ``samples_per_epoch`` items; item i is photograph i mod the number of photos."""

    def __init__(self, samples_per_epoch: int | None = None):
        self.samples_per_epoch = samples_per_epoch or DEFAULT_SAMPLES_PER_EPOCH
        if self.samples_per_epoch <= 0:
            raise ValueError(f"samples_per_epoch must be positive, got {self.samples_per_epoch}")
        photos = load_photos()
        self.names = list(photos)
        self.images = [Image.fromarray(pixels, "RGB") for pixels in photos.values()]
        self.num_distinct = len(self.images)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def load(self, index: int) -> Image.Image:
        return self.images[index % len(self.images)]

    def name(self, index: int) -> str:
        return f"skimage.data.{self.names[index % len(self.names)]}"
