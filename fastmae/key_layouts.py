"""Weights in other libraries' key layouts: timm's VisionTransformer and HF transformers' ViTMAE.

timm names the encoder as fastmae (and the reference) do, so its mapping only drops the decoder and
folds a linear probe's BatchNorm into its head. HF ViTMAE renames every module and splits ``qkv``
into ``query``/``key``/``value``; ``hf_to_fastmae`` reads the layout ``fastmae export`` writes,
transformers 5's saved layout (``decoder.decoder_encoder.layer``) and its in-memory names
(``q/k/v/o_proj``, ``mlp.fc1/fc2``). ``checkpoint.state_dict_of`` uses it, so every command reads
HF weights.
"""

from __future__ import annotations

import re

import torch

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
