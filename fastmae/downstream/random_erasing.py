"""Random erasing as the reference's fine-tuning runs it (``--reprob 0.25 --remode pixel --recount 1``):
timm's ``RandomErasing`` on the normalised image, written again without timm.

With probability ``prob``, 1 to ``max_count`` rectangles (uniformly many) are erased: each covers
a fraction of the image drawn uniformly from [0.02, 1/3] (divided by their number) with a log-uniform aspect ratio in
[0.3, 1/0.3]; up to 10 tries to find one that fits. ``pixel`` fills with standard normal noise
per pixel, ``rand`` with one normal colour per rectangle, ``const`` with zeros (the normalised
mean). Random draws come from a numpy Generator, so a DataLoader worker's seed fixes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

MODES = ("pixel", "rand", "const")
MIN_AREA, MAX_AREA = 0.02, 1 / 3
MIN_ASPECT = 0.3
ATTEMPTS = 10


@dataclass(frozen=True)
class RandomErasing:
    prob: float = 0.25
    mode: str = "pixel"
    max_count: int = 1

    def __post_init__(self):
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"--reprob must be in [0, 1], got {self.prob}")
        if self.mode not in MODES:
            raise ValueError(f"--remode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.max_count < 1:
            raise ValueError(f"--recount must be >= 1, got {self.max_count}")

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """image: normalised float [C, H, W], erased in place and returned."""
        if rng.random() > self.prob:
            return image
        channels, height, width = image.shape
        log_aspect = (math.log(MIN_ASPECT), math.log(1 / MIN_ASPECT))
        count = 1 if self.max_count == 1 else int(rng.integers(1, self.max_count + 1))
        for _ in range(count):
            for _ in range(ATTEMPTS):
                area = rng.uniform(MIN_AREA, MAX_AREA) * height * width / count
                aspect = math.exp(rng.uniform(*log_aspect))
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if w < width and h < height:
                    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                    image[:, top:top + h, left:left + w] = self._fill(channels, h, w, rng, image.dtype)
                    break
        return image

    def _fill(self, channels: int, h: int, w: int, rng: np.random.Generator, dtype: torch.dtype) -> torch.Tensor:
        if self.mode == "pixel":
            return torch.from_numpy(rng.standard_normal((channels, h, w), dtype=np.float32)).to(dtype)
        if self.mode == "rand":
            return torch.from_numpy(rng.standard_normal((channels, 1, 1), dtype=np.float32)).to(dtype)
        return torch.zeros((channels, 1, 1), dtype=dtype)
