"""``fastmae visualize``: reconstructions of a pretrained MAE in the paper's figure layout.

    fastmae visualize --checkpoint output_dir/checkpoint-799.pth --images photos/ --mask_ratio 0.75 0.9 --output rec.png

Each image is resized (shorter side) and centre-cropped to the model's size; each row shows one
image at one mask ratio: masked input | reconstruction with the visible patches pasted back |
original. Norm-pix models are shown de-normalised with each patch's own statistics.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from PIL import Image

from fastmae.atomic_file import refuse_to_replace
from fastmae.checkpoint import load_weights, read_checkpoint, saved_args, state_dict_of
from fastmae.data.augment import normalize, resize_center_crop
from fastmae.data.sources import IMAGE_EXTENSIONS, list_image_files, refuse_empty_data_path
from fastmae.device import device_from_flag
from fastmae.models import create_model
from fastmae.reconstruction import save_reconstructions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="pretrained MAE checkpoint (with its decoder)")
    parser.add_argument("--images", required=True, nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--mask_ratio", type=float, nargs="+", default=[0.75], help="one row per image and ratio")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--model", default=None, help="architecture (default: the checkpoint's args)")
    parser.add_argument("--norm_pix_loss", action="store_true", default=None,
                        help="the model predicts per-patch normalised pixels (default: the checkpoint's args)")
    parser.add_argument("--num_images", type=int, default=8, help="at most this many images (sorted by path)")
    parser.add_argument("--seed", type=int, default=0, help="masking noise seed")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def image_paths(inputs: list[str]) -> list[tuple[Path, bool]]:
    """-> (path, named on the command line) for each image file of ``inputs``, in order."""
    paths: list[tuple[Path, bool]] = []
    for item in inputs:
        refuse_empty_data_path(item, "--images")
        path = Path(item)
        if path.is_dir():
            try:
                paths.extend((found, False) for found in list_image_files(path, train_split=False))
            except ValueError:
                raise ValueError(f"--images: {path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})") from None
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(f"{path} is not an image file ({', '.join(IMAGE_EXTENSIONS)})")
            paths.append((path, True))
        else:
            raise ValueError(f"--images: {path} does not exist")
    return paths


def load_images(candidates: list[tuple[Path, bool]], size: int, limit: int) -> tuple[torch.Tensor, list[Path]]:
    """The first ``limit`` readable images -> (normalised [N, 3, size, size] (shorter side resized,
    centre crop), their paths). An unreadable file found in a folder is skipped and said; one named
    on the command line is an error."""
    crops, used = [], []
    for path, named in candidates:
        if len(used) == limit:
            break
        try:
            with Image.open(path) as img:
                crops.append(torch.from_numpy(resize_center_crop(img, size)).permute(2, 0, 1))
            used.append(path)
        except (OSError, Image.DecompressionBombError) as err:
            if named:
                raise ValueError(f"cannot read image {path}: {err}") from err
            print(f"skipped {path}: not a readable image ({err})", file=sys.stderr)
    if not crops:
        raise ValueError(f"--images: none of the {len(candidates)} image files could be read")
    return normalize(torch.stack(crops)), used


def load_mae(checkpoint: str, model_name: str | None, norm_pix_loss: bool | None):
    container = read_checkpoint(checkpoint)
    state = state_dict_of(container)
    saved = saved_args(container)
    model_name = model_name or saved.get("model")
    if not model_name:
        raise ValueError(f"{checkpoint} does not name its architecture: pass --model (e.g. mae_vit_base_patch16)")
    if "decoder_pred.weight" not in state:
        raise ValueError(f"{checkpoint} has no MAE decoder (encoder-only or fine-tuned): nothing to reconstruct with")
    norm_pix = norm_pix_loss if norm_pix_loss is not None else bool(saved.get("norm_pix_loss", False))
    weight, pos = state["patch_embed.proj.weight"], state["pos_embed"]  # [D, C, p, p], [1, 1+L, D]
    img_size = math.isqrt(pos.shape[1] - 1) * weight.shape[-1]
    name = model_name if model_name.startswith("mae_") else f"mae_{model_name}"
    model = create_model(name, img_size=img_size, in_chans=weight.shape[1], norm_pix_loss=norm_pix)
    report = load_weights(model, state)
    if report.missing:
        raise ValueError(f"{checkpoint} does not fit {name}: missing {report.missing[:5]}")
    return model.eval(), norm_pix


def run(args) -> int:
    try:
        refuse_to_replace("--output", args.output, {"--checkpoint": args.checkpoint,
                                                    **{f"--images {item}": item for item in args.images}})
        model, norm_pix = load_mae(args.checkpoint, args.model, args.norm_pix_loss)
        if model.in_chans != 3:
            raise ValueError(f"the model takes {model.in_chans}-channel images; visualize reads RGB images")
        if args.num_images < 1:
            raise ValueError(f"--num_images must be >= 1, got {args.num_images}")
        imgs, paths = load_images(image_paths(args.images), model.patch_embed.img_size[0], args.num_images)
        noise = torch.rand(len(paths), model.num_patches, generator=torch.Generator().manual_seed(args.seed))
        model.to(device_from_flag(args.device))
        out = save_reconstructions(model, imgs, args.output, mask_ratios=tuple(args.mask_ratio), noise=noise)
    except (ValueError, FileNotFoundError) as err:
        print(f"fastmae visualize: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a quota: an earlier figure of that name is kept
        print(f"fastmae visualize: error: could not write {args.output}: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {len(paths)} images x mask ratios {args.mask_ratio}"
          f"{' (norm-pix, de-normalised per patch)' if norm_pix else ''}")
    return 0
