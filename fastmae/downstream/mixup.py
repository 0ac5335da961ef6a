"""Mixup and CutMix with label smoothing, per batch, as timm's ``Mixup`` in 'batch' mode (which the
reference fine-tuning uses), without torchvision or timm.

Each batch is mixed with itself reversed: mixup blends whole images with weight lam ~ Beta(a, a);
cutmix pastes a box of area ~(1 - lam) and lam is corrected to the box actually pasted. When
both are on, cutmix is picked with ``switch_prob``. Targets become smoothed one-hot vectors mixed
with the same lam; train against them with ``soft_target_cross_entropy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """labels [N] -> [N, num_classes]: 1 - smoothing + smoothing/K on the class, smoothing/K elsewhere."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits, target [N, K] -> mean over the batch of -sum(target * log_softmax(logits))."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box covering about (1 - lam) of the image, centre uniform, clipped: (top, bottom, left, right)."""
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = rng.integers(height), rng.integers(width)
    top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    return int(top), int(bottom), int(left), int(right)


@dataclass
class Mixup:
    num_classes: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    seed: int | None = None

    def __post_init__(self):
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"mixup/cutmix alphas must be >= 0, got {self.mixup_alpha}/{self.cutmix_alpha}")
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("Mixup needs mixup_alpha > 0 or cutmix_alpha > 0")
        if not 0 <= self.prob <= 1 or not 0 <= self.switch_prob <= 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError(f"invalid probabilities: prob={self.prob}, switch_prob={self.switch_prob}, "
                             f"label_smoothing={self.label_smoothing}")
        self.rng = np.random.default_rng(self.seed)

    def reseed(self, *key: int) -> None:
        """Draw from now on from a generator of ``key`` (e.g. seed, epoch, rank)."""
        self.rng = np.random.default_rng(list(key))

    def _draw(self) -> tuple[float, bool]:
        """-> (lam, use_cutmix)."""
        if self.rng.random() >= self.prob:
            return 1.0, False
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or self.rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(self.rng.beta(alpha, alpha)), use_cutmix

    def __call__(self, imgs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """imgs [N, C, H, W], labels [N] -> mixed imgs [N, C, H, W], soft targets [N, num_classes]."""
        if imgs.shape[0] % 2:
            raise ValueError(f"mixup needs an even batch size (it pairs sample i with N-1-i), got {imgs.shape[0]}")
        lam, use_cutmix = self._draw()
        if lam < 1.0:
            flipped = imgs.flip(0)
            if use_cutmix:
                H, W = imgs.shape[-2:]
                top, bottom, left, right = cutmix_box(H, W, lam, self.rng)
                imgs = imgs.clone()
                imgs[:, :, top:bottom, left:right] = flipped[:, :, top:bottom, left:right]
                lam = 1.0 - (bottom - top) * (right - left) / (H * W)
            else:
                imgs = imgs * lam + flipped * (1.0 - lam)
        y1 = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        y2 = smooth_one_hot(labels.flip(0), self.num_classes, self.label_smoothing)
        return imgs, y1 * lam + y2 * (1.0 - lam)
