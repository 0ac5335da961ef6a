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

``timm_to_fastmae`` and ``hf_to_fastmae`` map back, so either export loads into fastmae again.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from fastmae.atomic_file import atomic_write, refuse_to_replace
from fastmae.bench.environment import write_json
from fastmae.checkpoint import atomic_save, read_checkpoint, saved_args, state_dict_of
from fastmae.models import create_model

DECODER_PREFIXES = ("decoder_", "mask_token")  # decoder_embed, decoder_blocks, decoder_norm, decoder_pred, ...

# per block: fastmae suffix -> HF suffix (qkv is split separately)
HF_BLOCK_KEYS = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
HF_TOP_KEYS = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}
HF_STACKS = {"blocks": "vit.encoder.layer", "decoder_blocks": "decoder.decoder_layers"}
QKV = ("query", "key", "value")


# ---- timm ----
LINEAR_PROBE_BN_EPS = 1e-6  # linprobe's BatchNorm1d(affine=False, eps=1e-6), the reference's


def fastmae_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder (and classifier head) keys as timm names them, which are ours: the decoder is dropped. A
    linear probe's head (BatchNorm without affine, then Linear: ``head.0.*``, ``head.1.*``) becomes the one
    Linear timm has, its evaluation-mode BatchNorm folded in: the same logits."""
    out = {k: v for k, v in state.items() if not k.startswith(DECODER_PREFIXES + ("head.",))}
    if "head.1.weight" in state:
        inv_std = (state["head.0.running_var"].double() + LINEAR_PROBE_BN_EPS).rsqrt()  # [D]
        weight, mean = state["head.1.weight"].double(), state["head.0.running_mean"].double()  # [K, D], [D]
        out["head.weight"] = (weight * inv_std).to(state["head.1.weight"].dtype)
        out["head.bias"] = (state["head.1.bias"].double() - (weight * inv_std) @ mean).to(state["head.1.bias"].dtype)
    else:
        out.update({k: v for k, v in state.items() if k.startswith("head.")})
    return out


def timm_to_fastmae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT -> fastmae encoder keys (identical names; timm-only extras such as reg tokens refused)."""
    unknown = [k for k in state if not re.match(r"(cls_token|pos_embed|patch_embed\.|blocks\.\d+\.|norm\.|fc_norm\.|head\.)", k)]
    if unknown:
        raise ValueError(f"not a plain timm ViT state_dict; unknown keys: {unknown[:5]}")
    return dict(state)


# ---- HF transformers ViTMAE ----
def fastmae_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fastmae / reference MAE state_dict -> ViTMAEForPreTraining state_dict (q, k, v split from qkv)."""
    out = {}
    for key, value in state.items():
        if key in HF_TOP_KEYS:
            out[HF_TOP_KEYS[key]] = value
            continue
        m = re.fullmatch(r"(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            raise ValueError(f"no HF ViTMAE name for {key!r} (only MAE encoder/decoder weights export to HF)")
        stack, index, module, kind = m.groups()
        prefix = f"{HF_STACKS[stack]}.{index}"
        if module == "attn.qkv":  # rows ordered q, k, v
            for name, part in zip(QKV, value.chunk(3, dim=0)):
                out[f"{prefix}.attention.attention.{name}.{kind}"] = part.clone()
        elif module in HF_BLOCK_KEYS:
            out[f"{prefix}.{HF_BLOCK_KEYS[module]}.{kind}"] = value
        else:
            raise ValueError(f"no HF ViTMAE name for {key!r}")
    return out


# transformers' other names for a block's stack and parts: 5.x saves the decoder's stack as
# decoder_encoder.layer, and names the modules in memory q/k/v/o_proj and mlp.fc1/fc2
HF_STACK_ALIASES = {"vit.layers": "vit.encoder.layer", "decoder.decoder_encoder.layer": "decoder.decoder_layers"}
HF_PROJECTIONS = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}
HF_MODULE_ALIASES = {"attention.o_proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
                     "mlp.fc2": "output.dense"}


def is_hf_layout(state: dict[str, torch.Tensor]) -> bool:
    """Keys of transformers' ViTMAEForPreTraining (``vit.``) or ViTMAEModel (``embeddings.``)."""
    return any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in state)


def hf_to_fastmae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ViTMAEForPreTraining (or ViTMAEModel, without the ``vit.`` prefix) state_dict -> fastmae keys:
    as saved (transformers 4 and 5, and ``fastmae export``) or as transformers 5 names it in memory."""
    if not any(k.startswith("vit.") for k in state):
        state = {(k if k.startswith("decoder.") else f"vit.{k}"): v for k, v in state.items()}
    top = {hf: ours for ours, hf in HF_TOP_KEYS.items()}
    stacks = {hf: ours for ours, hf in HF_STACKS.items()}
    block = {hf: ours for ours, hf in HF_BLOCK_KEYS.items()}
    out, qkv_parts = {}, {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.fullmatch(r"(vit\.encoder\.layer|vit\.layers|decoder\.decoder_layers|decoder\.decoder_encoder\.layer)"
                         r"\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            raise ValueError(f"unknown HF ViTMAE key {key!r}")
        stack, index, module, kind = m.groups()
        prefix = f"{stacks[HF_STACK_ALIASES.get(stack, stack)]}.{index}"
        module = HF_MODULE_ALIASES.get(module, module)
        projection = module.rsplit(".", 1)[-1]
        if module.startswith("attention.attention.") or (module.startswith("attention.") and projection in HF_PROJECTIONS):
            qkv_parts.setdefault(f"{prefix}.attn.qkv.{kind}", {})[HF_PROJECTIONS.get(projection, projection)] = value
        elif module in block:
            out[f"{prefix}.{block[module]}.{kind}"] = value
        else:
            raise ValueError(f"unknown HF ViTMAE key {key!r}")
    for key, parts in qkv_parts.items():
        if set(parts) != set(QKV):
            raise ValueError(f"{key}: HF checkpoint lacks {sorted(set(QKV) - set(parts))}")
        out[key] = torch.cat([parts[name] for name in QKV], dim=0)
    return out


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
    parser.add_argument("--format", required=True, choices=["timm", "hf"])
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
