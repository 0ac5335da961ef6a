"""Vision Transformer building blocks with timm's parameter names (the reference code's).

``Block`` is pre-norm: x + attn(norm1(x)), then x + mlp(norm2(x)); the MLP uses exact (erf) GELU.
``drop_path`` is only used by fine-tuning; pretraining runs without it, as the reference does.
With ``kernels`` resolving to Triton, eager blocks run every residual add together with the LayerNorm
that follows it as one fused kernel (``fastmae.kernels.layer_norm``) with the same parameters;
``forward_blocks`` chains that across block boundaries and into a final norm. Under torch.compile
blocks keep the plain modules, which inductor fuses itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.modules.module as nn_module  # the global hook registries nn.Module.__call__ runs

from fastmae import kernels as ops
from fastmae.attention import Attention


class PatchEmbed(nn.Module):
    """Images [N, C, H, W] -> tokens [N, L, D] through a stride-p convolution (``proj``)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (fine-tuning); identity when p == 0 or in eval mode."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        attn_backend: str = "sdpa",
        drop_path: float = 0.0,
        kernels: str = "torch",
    ):
        super().__init__()
        self.kernels = ops.check_kernels_choice(kernels)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=attn_backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuses_norms(x):
            return _fused_chain([self], x, None)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def fuses_norms(self, x: torch.Tensor) -> bool:
        """Whether this block runs its norms through the fused add + LayerNorm op for input ``x``.

        Not when compiled, as part of a model or by itself (``Block.compile``, compile scope
        "blocks"): inductor fuses the norms, and chaining blocks must not bypass the compiled call.
        Nor when hooks wait on the calls the fused path skips (the block's and its norms': FSDP,
        activation checkpointing, profilers, FlopCounterMode), nor when a norm is not a LayerNorm the
        kernel computes (a module swapped in: an RMSNorm, a scaled or identity norm), whose forward must run.
        """
        if self._compiled_call_impl is not None or torch.compiler.is_compiling():
            return False
        if not (_fusable_norm(self.norm1) and _fusable_norm(self.norm2)):
            return False
        if _global_call_hooks() or any(_call_hooks(m) for m in (self, self.norm1, self.norm2)):
            return False
        return ops.resolve_kernels(self.kernels, x.device, self.norm1.weight.dtype) == "triton"

    def fused_body(self, x: torch.Tensor, h: torch.Tensor, norm_dtype: torch.dtype | None):
        """The block after its first norm (h = norm1(x)) -> (x + attn branch, mlp branch not yet added)."""
        n2 = self.norm2
        x, h = ops.add_layer_norm(x, self.drop_path(self.attn(h)), n2.weight, n2.bias, n2.eps, norm_dtype,
                                  path="triton")
        return x, self.drop_path(self.mlp(h))


def _fusable_norm(norm: nn.Module) -> bool:
    """A plain affine nn.LayerNorm over the last dim: what the fused add + LayerNorm op computes."""
    return type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None \
        and len(norm.normalized_shape) == 1


def _fusable_block(block: nn.Module, x: torch.Tensor) -> bool:
    """A fastmae Block whose own forward would run (not a wrapper around one, such as torch's activation
    checkpointing's, which forwards attribute lookups to it; nor a subclass with a forward of its own)."""
    return isinstance(block, Block) and type(block).forward is Block.forward and block.fuses_norms(x)


def _call_hooks(module: nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)


def _global_call_hooks() -> bool:
    return bool(nn_module._global_forward_pre_hooks or nn_module._global_forward_hooks
                or nn_module._global_backward_pre_hooks or nn_module._global_backward_hooks)


def forward_blocks(blocks, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
    """x through ``blocks`` in order, then ``norm`` if given.

    On the fused path each block's closing residual add runs in one pass with the LayerNorm that
    follows it (the next block's norm1, or ``norm``): the residual stream is read and written once
    per block boundary instead of by an add and then a norm.
    """
    if (not blocks or not all(_fusable_block(blk, x) for blk in blocks)
            or (norm is not None and (not _fusable_norm(norm) or _call_hooks(norm)))):
        for blk in blocks:
            x = blk(x)
        return x if norm is None else norm(x)
    return _fused_chain(blocks, x, norm)


def _fused_chain(blocks, x: torch.Tensor, norm: nn.LayerNorm | None) -> torch.Tensor:
    """forward_blocks for blocks that all fuse their norms."""
    # Under autocast the norms' consumers (qkv, fc1) cast to the autocast dtype: write it directly.
    device = x.device.type
    norm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    x = x.contiguous()  # the kernels read rows of the residual stream; a caller's view may not be laid out so
    branch = None
    for blk in blocks:
        n1 = blk.norm1
        x, h = ops.add_layer_norm(x, branch, n1.weight, n1.bias, n1.eps, norm_dtype, path="triton")
        x, branch = blk.fused_body(x, h, norm_dtype)
    if norm is None:
        return x + branch
    # The final norm's output is the model's output: its dtype is the residual stream's, as nn.LayerNorm's.
    return ops.add_layer_norm(x, branch, norm.weight, norm.bias, norm.eps, None, path="triton")[1]


def init_vit_weights(module: nn.Module) -> None:
    """Reference init: xavier-uniform Linear weights with zero bias, LayerNorm weight 1 bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
