"""Data loading: sources, CPU and GPU pipelines behind one interface (see ``loader``)."""

from fastmae.data.augment import IMAGENET_MEAN, IMAGENET_STD, sample_resized_crop
from fastmae.data.loader import DataConfig, ImageBatches, build_loader
from fastmae.data.sources import list_image_files, shard_indices

__all__ = [
    "DataConfig", "ImageBatches", "build_loader", "IMAGENET_MEAN", "IMAGENET_STD", "sample_resized_crop",
    "list_image_files", "shard_indices",
]
