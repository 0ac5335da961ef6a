"""Multi-head self-attention with a switchable backend.

Parameters and their layout are timm's ``Attention`` (one ``qkv`` Linear with rows ordered
q, k, v; one ``proj`` Linear), so reference checkpoints load unchanged. The backend only decides
how softmax(QK^T / sqrt(d)) V is computed:

- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (FlashAttention-2, cuDNN or
  memory-efficient kernels on GPU; the default),
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` when xformers is installed,
- ``"math"``: the explicit softmax(QK^T)V of the reference code.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION_BACKENDS = ("sdpa", "xformers", "math")


def check_attention_backend(backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ValueError("attention backend 'xformers' asked for, but xformers is not installed "
                         "(pip install 'fastmae[xformers]')")
    return backend


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v [B, H, T, hd] -> [B, H, T, hd], the reference formulation."""
    scale = q.shape[-1] ** -0.5
    attn = (q @ k.transpose(-2, -1)) * scale
    return attn.softmax(dim=-1) @ v


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = check_attention_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)
        if self.backend == "xformers":
            import xformers.ops as xops

            q, k, v = qkv.unbind(2)  # [B, T, H, hd] each, xformers' layout
            out = xops.memory_efficient_attention(q, k, v).reshape(B, T, C)
        else:
            # [B, H, T, hd] each. Unbound along dim 2, backward stacks the three gradients straight
            # into qkv's [B, T, 3, H, hd] layout, which the reshape's backward takes as a view; unbound
            # after permute(2, 0, 3, 1, 4) they are stacked as [3, B, H, T, hd] and then copied once
            # more: a read and a write of the qkv gradient in every block (the same values).
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
            if self.backend == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v)
            else:
                out = attention_math(q, k, v)
            out = out.transpose(1, 2).reshape(B, T, C)
        return self.proj(out)
