"""Checkpoints in the reference container, read safely and written atomically.

The reference saves ``{'model': state_dict, 'optimizer', 'epoch', 'scaler', 'args'}``; released
weights hold only ``'model'``. We read that container or a bare state_dict (or a .safetensors file)
with ``torch.load(weights_only=True)``: nothing but tensors and plain containers is unpickled (the
reference's ``argparse.Namespace`` in 'args' is allowed, it is a plain attribute bag). We write the
same container with 'args' as a plain dict, so the reference code and any weights-only loader read it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fastmae.atomic_file import atomic_write
from fastmae.key_layouts import hf_to_fastmae, is_hf_layout
from fastmae.pos_embed import interpolate_pos_embed

POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")
# Keys of other heads that a pretraining model legitimately does not have (fine-tuned files).
FOREIGN_PREFIXES = ("head.", "fc_norm.", "bn.")


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, another format, unsafe to unpickle):
    not one that reads and does not fit the model."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The whole container (a dict) of a .pth/.pt or .safetensors file, read without arbitrary unpickling."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        weights = _hf_folder_weights(path)
        if weights is not None:
            return weights
    if path.is_dir():
        raise ValueError(folder_given_message(path))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return {"model": load_file(str(path))}
        except SafetensorError as err:
            raise UnreadableCheckpoint(f"checkpoint {path} is not a readable safetensors file (truncated, corrupt, "
                                       f"or another format): {err}") from None
    if path.stat().st_size == 0:
        raise UnreadableCheckpoint(f"checkpoint {path} is empty (0 bytes)")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # an unsafe pickle or a broken file: say which
            raise UnreadableCheckpoint(_unreadable_checkpoint(path, err)) from err
    if not isinstance(obj, dict):
        raise UnreadableCheckpoint(f"checkpoint {path} holds a {type(obj).__name__}, not a dict or state_dict")
    return obj


# the weight files of a Hugging Face model folder (save_pretrained's), whole or sharded, by preference
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def _hf_folder_weights(folder: Path) -> dict | None:
    """A Hugging Face model folder's weights as a container (shards joined); None where it has no weight file."""
    name = next((n for n in HF_WEIGHT_FILES if (folder / n).is_file()), None)
    if name is None:
        return None
    if not name.endswith(".index.json"):
        return read_checkpoint(folder / name)
    index = folder / name
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"checkpoint {index} is not a readable shard index (no weight_map): {err!r}") from None
    state = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"checkpoint {folder}: {index.name} lists the shard {shard}, which is missing")
        container = read_checkpoint(folder / shard)  # a shard is a bare state_dict (safetensors: under "model")
        state.update(container["model"] if shard.endswith(".safetensors") else container)
    return {"model": state}  # in HF's names: state_dict_of maps the whole, as a shard may hold no HF marker key


def check_resume_file(path: Path) -> None:
    """``--resume FILE``: a ValueError unless FILE is a file (a run's folder names its checkpoints)."""
    if path.is_dir():
        raise ValueError(f"--resume {path}: {folder_given_message(path)}")
    if not path.is_file():
        raise ValueError(f"--resume {path}: no such file")


def folder_given_message(path: Path) -> str:
    """A checkpoint flag given a folder (a run's --output_dir, most often): name the files in it."""
    files = sorted((p for p in path.iterdir() if p.suffix in (".pth", ".pt", ".safetensors") and p.is_file()),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    if not files:
        return f"checkpoint {path} is a folder, not a checkpoint file, and holds no .pth or .safetensors file"
    newest = ", ".join(p.name for p in files[:3]) + (", ..." if len(files) > 3 else "")
    return f"checkpoint {path} is a folder, not a checkpoint file; give one of its files, newest first: {newest}"


def _unreadable_checkpoint(path: Path, err: Exception) -> str:
    """What to tell the user instead of torch.load's advice to load with weights_only=False."""
    unsafe = re.search(r"\bGLOBAL ([\w.]+)", str(err))  # a class or function the pickle would call
    if unsafe:
        return (f"checkpoint {path} holds Python objects other than tensors and plain containers "
                f"({unsafe.group(1)}); fastmae reads checkpoints weights-only and does not unpickle them. "
                "If you trust the file, load it with torch.load(weights_only=False) and save its state_dict")
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
    first_line = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    reason = unpickler.group(1).strip() if unpickler else first_line.split(". ")[0]
    return (f"checkpoint {path} is not a readable PyTorch or safetensors file (truncated, corrupt, or another "
            f"format): {reason}")


def saved_args(container: dict) -> dict:
    """The 'args' a checkpoint was trained with (a dict, or the reference's argparse.Namespace); {} if none."""
    args = container.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return args if isinstance(args, dict) else {}


def state_dict_of(container: dict) -> dict[str, torch.Tensor]:
    """The model weights in a container: 'model' (reference), 'state_dict', or the dict itself; keys
    of a DDP or compiled model's save without their ``module.``/``_orig_mod.`` prefixes, so that every
    command reads such a file as ``load_weights`` does."""
    for key in ("model", "state_dict", "model_state"):
        if key in container and isinstance(container[key], dict):
            return _in_fastmae_keys(without_wrapper_prefixes(container[key]))
    if container and all(isinstance(v, torch.Tensor) for v in container.values()):
        return _in_fastmae_keys(without_wrapper_prefixes(container))
    raise ValueError(f"no model weights found in checkpoint (top-level keys: {sorted(container)[:10]})")


def _in_fastmae_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ViTMAE weights (``fastmae export --format hf``, facebook/vit-mae-*) under fastmae's names."""
    return hf_to_fastmae(state) if is_hf_layout(state) else state


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # the model's own fixed sin-cos table for its grid
    replaced: list[str] = field(default_factory=list)  # of another shape in the file, left as initialised

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.interpolated:
            lines.append("interpolated to the model's grid: " + ", ".join(self.interpolated))
        if self.kept:
            lines.append("another grid in the checkpoint (the model's own sin-cos table kept): " + ", ".join(self.kept))
        if self.replaced:
            lines.append("another shape in the checkpoint (left as initialised): " + ", ".join(self.replaced))
        if self.missing:
            lines.append(f"not in the checkpoint ({len(self.missing)}, left as initialised): " + _summarise(self.missing))
        if self.unexpected:
            lines.append(f"in the checkpoint but not the model ({len(self.unexpected)}, ignored): " + _summarise(self.unexpected))
        return "\n".join(lines)


def _summarise(keys: list[str]) -> str:
    """Collapse 'decoder_blocks.3.mlp.fc1.weight' and friends into 'decoder_blocks.* (N)'."""
    groups: dict[str, int] = {}
    for key in keys:
        head = re.sub(r"\.\d+\..*", ".*", key) if re.search(r"\.\d+\.", key) else key
        groups[head] = groups.get(head, 0) + 1
    return ", ".join(f"{k} ({n})" if n > 1 else k for k, n in groups.items())


def _num_blocks(keys, prefix: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(rf"{prefix}\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def load_weights(model: nn.Module, source, strict: bool = False, replaceable: tuple[str, ...] = ()) -> LoadReport:
    """Load a checkpoint path, container or state_dict into ``model``; returns what happened.

    Shapes must match (a different architecture is a ValueError naming the tensor), except for the
    ``replaceable`` keys, which are then left as initialised (a classifier head for another number of
    classes); learned position embeddings of another image size are interpolated, the MAE's fixed sin-cos
    tables kept as the model made them for its grid; an encoder-only file loads
    with the decoder reported as missing. ``strict=True`` makes any missing or unexpected key an error.
    """
    if isinstance(source, (str, os.PathLike)):
        source = read_checkpoint(source)
    state = state_dict_of(source)
    model = unwrap_model(model)  # DDP's and torch.compile's keys carry their prefix; the weights are the model's
    own = model.state_dict()
    report = LoadReport()

    for prefix in ("blocks", "decoder_blocks"):
        theirs, ours = _num_blocks(state, prefix), _num_blocks(own, prefix)
        # a model without such blocks (a classifier has no decoder) just reports them unexpected
        if theirs and ours and theirs != ours:
            raise ValueError(f"checkpoint is a different architecture: it has {theirs} {prefix}, the model {ours}")

    to_load = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        if key in POS_EMBED_KEYS and value.shape != own[key].shape and value.shape[-1] == own[key].shape[-1]:
            if key in getattr(model, "FIXED_POS_EMBED_KEYS", ()):
                report.kept.append(key)
                continue
            value = interpolate_pos_embed(value, own[key].shape[-2] - 1)  # a learned table (a classifier's)
            report.interpolated.append(key)
        if value.shape != own[key].shape and key in replaceable:
            report.replaced.append(key)
            continue
        if value.shape != own[key].shape:
            raise ValueError(
                f"checkpoint is a different architecture: {key} has shape {list(value.shape)} in the file, "
                f"{list(own[key].shape)} in the model"
            )
        to_load[key] = value
    if not to_load:
        raise ValueError("no tensor of the checkpoint matches the model: wrong file or wrong model")
    report.missing = [k for k in own if k not in to_load and k not in report.replaced and k not in report.kept]
    report.loaded = list(to_load)
    if strict and (report.missing or report.unexpected or report.replaced or report.kept):
        raise ValueError("strict load failed:\n" + str(report))
    model.load_state_dict(to_load, strict=False)
    return report


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP's, torch.compile's


def without_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict saved from a DDP or compiled model (every key ``module.``/``_orig_mod.``-prefixed,
    in any nesting), with the keys of the model inside."""
    while state and any(all(key.startswith(prefix) for key in state) for prefix in WRAPPER_PREFIXES):
        prefix = next(p for p in WRAPPER_PREFIXES if all(key.startswith(p) for key in state))
        state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save, replacing ``path`` whole: a kill mid-save leaves the previous file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def plain_args(args) -> dict | None:
    """argparse.Namespace or a dataclass -> a dict of plain values (safe for weights-only loading)."""
    if args is None:
        return None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    elif hasattr(args, "__dataclass_fields__"):
        import dataclasses

        args = dataclasses.asdict(args)
    return {k: plain_value(v) for k, v in args.items()}


def plain_value(value):
    """A value as weights-only loading reads it back: numpy and 0-d tensor scalars as Python numbers
    (np.float64 is a float subclass that torch.load refuses; np.bool_(False) as a string would read as
    true), lists and tuples element by element, anything else as its text."""
    if isinstance(value, (np.generic, torch.Tensor)) and getattr(value, "ndim", 0) == 0:
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(plain_value(v) for v in value)
    if value is None or type(value) in (int, float, str, bool):
        return value
    return str(value)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers, in any nesting:
    their state_dict keys carry the wrapper's prefix, which the reference code cannot load."""
    for attr in ("module", "_orig_mod"):
        while isinstance(getattr(model, attr, None), nn.Module):
            model = getattr(model, attr)
    return model


def optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with each group's lr a float, as the reference saves it: a CUDA-graph
    step keeps it as a device tensor (``fastmae.train.cuda_graph``), which an eager run would load
    as a tensor on another device."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
    return state


def save_checkpoint(path, model: nn.Module, optimizer=None, epoch: int | None = None, scaler=None,
                    args=None, **extra) -> None:
    """The reference container, atomically. ``extra`` holds what exact resumption needs beyond it."""
    container = {"model": unwrap_model(model).state_dict()}
    if optimizer is not None:
        container["optimizer"] = optimizer_state(optimizer)
    if epoch is not None:
        container["epoch"] = int(epoch)  # np.int64 would make the file unreadable weights-only
    if scaler is not None and scaler.is_enabled():
        # a disabled scaler's state is {}, which the reference's GradScaler refuses to load; without the
        # key, its load_model keeps its own scaler
        container["scaler"] = scaler.state_dict()
    if args is not None:
        container["args"] = plain_args(args)
    container.update(extra)
    atomic_save(container, path)
