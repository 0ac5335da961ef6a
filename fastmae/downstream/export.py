"""``fastmae export``: carry a fastmae / reference MAE checkpoint into timm or HF transformers.

- ``--format timm``: timm's VisionTransformer keys, which are the encoder's own names
  (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.i.*``, ``norm``; a fine-tuned
  classifier keeps ``fc_norm`` and ``head``); the decoder and ``mask_token`` are dropped. One
  ``.safetensors`` (or weights-only ``.pth``) file; load it into e.g.
  ``timm.create_model("vit_base_patch16_224", num_classes=0)`` with ``load_state_dict(..., strict=False)``.
- ``--format hf``: a folder that ``transformers.ViTMAEForPreTraining.from_pretrained`` (or
  ``ViTMAEModel``) reads: ``config.json`` + ``model.safetensors`` in the layout of the published
  ``facebook/vit-mae-*`` weights: ``vit.embeddings.*``, ``vit.encoder.layer.i.attention.attention.
  {query,key,value}`` (split from ``qkv``), ``attention.output.dense``, ``layernorm_before/after``,
  ``intermediate.dense``, ``output.dense``, ``vit.layernorm``, and the decoder under ``decoder.*``.

The mappings (and ``timm_to_fastmae`` / ``hf_to_fastmae`` back) are in ``fastmae.key_layouts``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fastmae.atomic_file import atomic_write, refuse_to_replace
from fastmae.bench.environment import write_json
from fastmae.checkpoint import atomic_save, read_checkpoint, saved_args, state_dict_of
from fastmae.key_layouts import DECODER_PREFIXES, fastmae_to_hf, fastmae_to_timm
from fastmae.models import create_model


def hf_config(state: dict[str, torch.Tensor], model_name: str, norm_pix_loss: bool, mask_ratio: float = 0.75) -> dict:
    """config.json of transformers' ViTMAEConfig, sizes read from the weights, head counts from the named arch."""
    with torch.device("meta"):  # only for its config: no memory, no init
        arch = create_model(model_name).config
    D = state["cls_token"].shape[-1]
    proj = state["patch_embed.proj.weight"]  # [D, C, p, p]
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    # the head counts are not in the weights: they come from the named architecture, which must be this one
    found = {"width": D, "blocks": depth, "patch size": proj.shape[-1]}
    named = {"width": arch.embed_dim, "blocks": arch.depth, "patch size": arch.patch_size}
    if "decoder_embed.weight" in state:
        found["decoder width"] = state["decoder_embed.weight"].shape[0]
        found["decoder blocks"] = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks."))
        named.update({"decoder width": arch.decoder_embed_dim, "decoder blocks": arch.decoder_depth})
    differ = [f"{what} {found[what]} ({named[what]})" for what in found if found[what] != named[what]]
    if differ:
        raise ValueError(f"the weights are not --model {model_name}'s architecture (in brackets): {', '.join(differ)}; "
                         "the head counts come from --model, so give the one the checkpoint was trained as")
    config = {
        "architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae",
        "hidden_size": D, "num_hidden_layers": depth, "num_attention_heads": arch.num_heads,
        "intermediate_size": state["blocks.0.mlp.fc1.weight"].shape[0], "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": arch.norm_eps, "image_size": grid * proj.shape[-1], "patch_size": proj.shape[-1],
        "num_channels": proj.shape[1], "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "mask_ratio": mask_ratio, "norm_pix_loss": norm_pix_loss,
    }
    if "decoder_embed.weight" in state:
        config.update({
            "decoder_hidden_size": found["decoder width"],
            "decoder_num_hidden_layers": found["decoder blocks"],
            "decoder_num_attention_heads": arch.decoder_num_heads,
            "decoder_intermediate_size": state["decoder_blocks.0.mlp.fc1.weight"].shape[0],
        })
    return config


# ---- files ----
def save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """Written whole or not at all: an export over an earlier one that the disk refuses keeps that one."""
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save(state, metadata={"format": "pt"})
        atomic_write(path, lambda f: f.write(data))
    elif path.suffix in (".pth", ".pt", ".bin"):
        atomic_save(state, path)  # a bare state_dict: loads with weights_only=True
    else:
        raise ValueError(f"--output must end in .safetensors or .pth for timm, got {path}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="MAE checkpoint (.pth container or .safetensors)")
    parser.add_argument("--format", required=True, choices=["timm", "hf"],
                        help="timm: one weights file of timm's ViT; hf: a transformers ViTMAE folder")
    parser.add_argument("--output", required=True,
                        help="timm: a .safetensors (or .pth) file; hf: a folder for from_pretrained")
    parser.add_argument("--model", default=None, help="hf: architecture for the head counts (default: the checkpoint's args)")
    parser.add_argument("--norm_pix_loss", action="store_true", default=None,
                        help="hf: the model was trained with norm_pix_loss (default: the checkpoint's args)")


def run(args) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"fastmae export: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a quota: the earlier export (if any) is kept
        print(f"fastmae export: error: could not write {args.output}: {err}", file=sys.stderr)
        return 1


def _run(args) -> int:
    refuse_to_replace("--output", args.output, {"--checkpoint": args.checkpoint})
    container = read_checkpoint(args.checkpoint)
    state = state_dict_of(container)
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise ValueError(f"{args.checkpoint} holds no ViT encoder (no cls_token / patch_embed.proj.weight)")
    saved = saved_args(container)
    out = Path(args.output)
    if args.format == "timm":
        exported = fastmae_to_timm(state)
        save_state(exported, out)
        decoder = sum(k.startswith(DECODER_PREFIXES) for k in state)
        folded = " (the linear probe's BatchNorm folded into its head)" if "head.1.weight" in state else ""
        print(f"wrote {len(exported)} tensors in timm's ViT layout to {out}{folded} (dropped {decoder} decoder tensors)")
        return 0
    model_name = args.model or saved.get("model")
    if not model_name:
        raise ValueError(f"{args.checkpoint} does not name its architecture: pass --model (e.g. mae_vit_base_patch16)")
    model_name = model_name if model_name.startswith("mae_") else f"mae_{model_name}"
    if "norm.weight" not in state:
        raise ValueError(f"{args.checkpoint} has no encoder norm (a global-pool classifier has fc_norm instead): "
                         "HF ViTMAE needs it; export classifiers with --format timm")
    norm_pix = args.norm_pix_loss if args.norm_pix_loss is not None else bool(saved.get("norm_pix_loss", False))
    exported = fastmae_to_hf({k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))})
    config = hf_config(state, model_name, norm_pix, float(saved.get("mask_ratio", 0.75)))
    out.mkdir(parents=True, exist_ok=True)
    save_state(exported, out / "model.safetensors")
    write_json(out / "config.json", config)
    dropped = sorted({k.split(".")[0] for k in state if k.startswith(("head.", "fc_norm."))})
    if "decoder_embed.weight" in state:
        loads = f"transformers.ViTMAEForPreTraining.from_pretrained('{out}')"
    else:  # ViTMAEForPreTraining would make up a decoder, at random, and say so only in its loading info
        loads = f"encoder only: transformers.ViTMAEModel.from_pretrained('{out}')"
    print(f"wrote {len(exported)} tensors in HF ViTMAE layout + config.json to {out}/ ({loads})"
          + (f"; the classifier's {' and '.join(dropped)} left out" if dropped else ""))
    return 0
