"""The Masked Autoencoder ViT: the reference model (He et al., CVPR 2022), computed faster.

Parameters, state_dict keys, initialisation, masking, loss and outputs are those of the reference
``models_mae.MaskedAutoencoderViT``; for the same weights and noise it gives the same loss, pred and
mask to float64 round-off. What differs is how: the patch projection runs on the visible patches
only, the decoder un-shuffle, the loss and the blocks' residual add + LayerNorm are single fused ops
(``fastmae.kernels``), attention goes through SDPA, and in training the prediction head may run on
the removed patches only.

``encoder_mask_tokens=True`` is the paper's naive baseline "w/ [M]": the encoder sees all L patches,
the removed ones replaced by a learned mask token; everything else is MAE. It exists so speed-ups
are measured against the same engine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastmae import kernels as ops  # not `kernels`: that is the constructor argument's name
from fastmae.kernels.reference import patch_target_loss
from fastmae.attention import check_attention_backend
from fastmae.masking import Masking, random_masking
from fastmae.patches import patchify, unpatchify
from fastmae.pos_embed import sincos_2d
from fastmae.vit import Block, PatchEmbed, forward_blocks, init_vit_weights


REFERENCE_DEFAULT_NORM_EPS = 1e-5  # MaskedAutoencoderViT(norm_layer=nn.LayerNorm) in models_mae.py


def _square_size(name: str, value) -> int:
    """timm's img_size/patch_size may be an int or an (h, w) pair; the MAE grid is square."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} must be an int or a square (h, w) pair: the MAE's sin-cos position "
                             f"embeddings are for a square grid, got {value!r}")
        return value[0]
    return value


def _check_sizes(**sizes) -> None:
    """ValueError naming the first size out of range. A negative depth would build no blocks while the
    FLOP counts (fastmae.flops) multiply by it; depth 0 (no blocks) is a model, a width of 0 is not."""
    for name, value in sizes.items():
        least = 0 if name in ("depth", "decoder_depth") else 1
        if not value >= least:
            raise ValueError(f"{name} must be {'>= 0' if least == 0 else 'positive'}, got {value}")


def _check_mlp_ratio(mlp_ratio: float, *widths: int) -> None:
    """Any ratio that leaves every MLP a hidden unit, as timm's Mlp(dim, int(dim * mlp_ratio)) builds
    (below 1 too: a narrow MLP)."""
    if not mlp_ratio > 0 or int(min(widths) * mlp_ratio) < 1:  # `not >` also refuses NaN
        raise ValueError(f"mlp_ratio {mlp_ratio} leaves an MLP of width {min(widths)} no hidden unit "
                         f"(int(width x mlp_ratio) must be >= 1)")


class MaskedAutoencoderViT(nn.Module):
    # fixed sin-cos tables of the patch grid, never trained: a checkpoint of another image size loads
    # with the model's own tables (exact for its grid) rather than its tables interpolated
    FIXED_POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer=None,
        norm_pix_loss: bool = False,
        *,
        norm_eps: float | None = None,
        attn: str = "sdpa",
        kernels: str = "auto",
        encoder_mask_tokens: bool = False,
    ):
        super().__init__()
        img_size, patch_size = _square_size("img_size", img_size), _square_size("patch_size", patch_size)
        _check_sizes(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                     num_heads=num_heads, decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                     decoder_num_heads=decoder_num_heads)
        _check_mlp_ratio(mlp_ratio, embed_dim, decoder_embed_dim)
        if norm_layer is not None:  # reference scripts pass partial(nn.LayerNorm, eps=1e-6)
            norm_eps = _layernorm_eps(norm_layer)
        elif norm_eps is None:  # the reference's default norm_layer, nn.LayerNorm: eps 1e-5 (named models: 1e-6)
            norm_eps = REFERENCE_DEFAULT_NORM_EPS
        self.config = MAEConfig(
            img_size, patch_size, in_chans, embed_dim, depth, num_heads, decoder_embed_dim,
            decoder_depth, decoder_num_heads, mlp_ratio, norm_pix_loss, norm_eps,
        )
        self.kernels = ops.check_kernels_choice(kernels)
        check_attention_backend(attn)
        self.attn = attn
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.encoder_mask_tokens = encoder_mask_tokens

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        block = functools.partial(Block, mlp_ratio=mlp_ratio, qkv_bias=True, norm_eps=norm_eps, attn_backend=attn,
                                  kernels=kernels)
        self.blocks = nn.ModuleList([block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([block(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=norm_eps)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        if encoder_mask_tokens:
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.initialize_weights()

    # ---- initialisation (reference order: pos embeds, patch embed, tokens, then every module) ----
    def initialize_weights(self) -> None:
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid).float().unsqueeze(0))
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], grid).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.encoder_mask_tokens:
            nn.init.normal_(self.encoder_mask_token, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        """Reference API: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
        init_vit_weights(m)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.in_chans)

    def check_images(self, imgs: torch.Tensor) -> None:
        if imgs.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {list(imgs.shape)}")
        N, C, H, W = imgs.shape
        if C != self.in_chans:
            raise ValueError(f"images have {C} channels, the model expects in_chans={self.in_chans}")
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
        size = self.patch_embed.img_size[0]
        if (H, W) != (size, size):
            raise ValueError(f"image size {H}x{W} is not the model's img_size {size}x{size}")
        if not imgs.is_floating_point():
            raise ValueError(f"images must be floating point (normalised), got {imgs.dtype}")

    def random_masking_ids(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None) -> Masking:
        return random_masking(imgs.shape[0], self.num_patches, mask_ratio, imgs.device, noise)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Reference API: tokens x [N, L, D] -> (x_masked [N, K, D], mask [N, L], ids_restore [N, L])."""
        masking = random_masking(x.shape[0], x.shape[1], mask_ratio, x.device, noise)
        x_masked = torch.gather(x, 1, masking.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return x_masked, masking.mask, masking.ids_restore

    def _overrides(self, method: str) -> bool:
        """A subclass replaced this reference-API method (research code changes the loss or the masking so)."""
        return getattr(type(self), method) is not getattr(MaskedAutoencoderViT, method)

    # ---- encoder ----
    def encode(self, imgs: torch.Tensor, masking: Masking) -> torch.Tensor:
        """imgs [N, C, H, W] -> latent [N, 1+K, D] (naive baseline: [N, 1+L, D])."""
        w, b = self.patch_embed.proj.weight, self.patch_embed.proj.bias
        path = ops.resolve_kernels(self.kernels, imgs.device, w.dtype)
        if self.encoder_mask_tokens:
            x = ops.visible_patch_embed(imgs, None, w, b, self.pos_embed, self.cls_token, self.patch_size, path)
            removed = masking.mask.bool().unsqueeze(-1)
            mask_tokens = self.encoder_mask_token + self.pos_embed[:, 1:]
            x = torch.cat([x[:, :1], torch.where(removed, mask_tokens.to(x.dtype), x[:, 1:])], dim=1)
        else:
            x = ops.visible_patch_embed(
                imgs, masking.ids_keep, w, b, self.pos_embed, self.cls_token, self.patch_size, path
            )
        return forward_blocks(self.blocks, x, self.norm)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Reference API: -> (latent [N, 1+K, D], mask [N, L], ids_restore [N, L])."""
        self.check_images(imgs)
        if self._overrides("random_masking"):
            return self._encoder_through_random_masking(imgs, mask_ratio, noise)
        masking = self.random_masking_ids(imgs, mask_ratio, noise)
        return self.encode(imgs, masking), masking.mask, masking.ids_restore

    def _encoder_through_random_masking(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None):
        """The reference's encoder, for a subclass's own random_masking: every patch embedded, then masked."""
        if self.encoder_mask_tokens:
            raise ValueError("an overridden random_masking drops tokens, which the naive baseline "
                             "(encoder_mask_tokens=True) keeps as mask tokens")
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, *(() if noise is None else (noise,)))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return forward_blocks(self.blocks, torch.cat([cls, x], dim=1), self.norm), mask, ids_restore

    # ---- decoder ----
    def decode(self, latent: torch.Tensor, masking: Masking, full_pred: bool = True) -> torch.Tensor:
        """latent -> pred [N, L, p*p*C], or [N, L-K, p*p*C] for masking.ids_masked if not full_pred."""
        x = self.decoder_embed(latent)
        if self.encoder_mask_tokens:
            x = x + self.decoder_pos_embed
        else:
            path = ops.resolve_kernels(self.kernels, latent.device, x.dtype)
            x = ops.decoder_unshuffle(x, self.mask_token, masking.ids_restore, self.decoder_pos_embed, path)
        # decoder_norm stays outside the chain: in training it normalises only the gathered removed patches
        x = forward_blocks(self.decoder_blocks, x)[:, 1:, :]
        if not full_pred:
            x = torch.gather(x, 1, masking.ids_masked.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.decoder_pred(self.decoder_norm(x))

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Reference API: latent [N, 1+K, Dd-input], ids_restore [N, L] -> pred [N, L, p*p*C]."""
        len_keep = latent.shape[1] - 1
        ids_restore = ids_restore.to(torch.int64).contiguous()  # the kernels index with int64
        ids_shuffle = torch.argsort(ids_restore, dim=1)
        masking = Masking(ids_shuffle[:, :len_keep], ids_shuffle[:, len_keep:], ids_restore,
                          (ids_restore >= len_keep).to(torch.float32))
        return self.decode(latent, masking)

    # ---- loss ----
    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, masking: Masking, full_pred: bool = True) -> torch.Tensor:
        path = ops.resolve_kernels(self.kernels, imgs.device, pred.dtype)
        if full_pred:
            return ops.masked_patch_loss(pred, imgs, self.patch_size, self.norm_pix_loss, None, masking.mask, path)
        return ops.masked_patch_loss(pred, imgs, self.patch_size, self.norm_pix_loss, masking.ids_masked, None, path)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reference API: full pred [N, L, p*p*C] and mask [N, L] (any dtype, 1 = removed) -> loss."""
        if self._overrides("patchify"):  # a subclass's own target: the reference's arithmetic, on it
            return patch_target_loss(pred, self.patchify(imgs), self.norm_pix_loss, mask)
        path = ops.resolve_kernels(self.kernels, imgs.device, pred.dtype)
        mask = mask if mask.is_floating_point() else mask.to(torch.float32)
        return ops.masked_patch_loss(pred.contiguous(), imgs, self.patch_size, self.norm_pix_loss, None, mask, path)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None,
                full_pred: bool = True):
        """-> (loss, pred, mask). pred is [N, L, p*p*C]; with full_pred=False (training) the head runs
        on the removed patches only and pred is [N, L-K, p*p*C] in the order of ``ids_masked``.

        A subclass that overrides the reference's forward_encoder, forward_decoder, forward_loss,
        random_masking or patchify gets the reference's forward, through its methods (pred of all L
        patches)."""
        if any(self._overrides(method) for method in REFERENCE_STEPS):
            latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, *(() if noise is None else (noise,)))
            pred = self.forward_decoder(latent, ids_restore)
            return self.forward_loss(imgs, pred, mask), pred, mask
        self.check_images(imgs)
        masking = self.random_masking_ids(imgs, mask_ratio, noise)
        latent = self.encode(imgs, masking)
        pred = self.decode(latent, masking, full_pred)
        return self.loss(imgs, pred, masking, full_pred), pred, masking.mask


REFERENCE_STEPS = ("forward_encoder", "forward_decoder", "forward_loss", "random_masking", "patchify")


def _layernorm_eps(norm_layer) -> float:
    """The eps of ``norm_layer``; any other setting would change the model (the fused kernels and the
    reference's keys assume an affine LayerNorm with a bias), so it is refused, not dropped."""
    if isinstance(norm_layer, functools.partial) and norm_layer.func is nn.LayerNorm:
        defaults = {"elementwise_affine": True, "bias": True}  # restating them changes nothing
        others = sorted(k for k, v in norm_layer.keywords.items() if k != "eps" and not (k in defaults and v is True))
        if norm_layer.args or others:
            given = [repr(a) for a in norm_layer.args] + [f"{k}={norm_layer.keywords[k]!r}" for k in others]
            raise ValueError(f"norm_layer: only eps may be set on nn.LayerNorm (an affine LayerNorm with a bias, as "
                             f"the reference models'), got {', '.join(given)}")
        return norm_layer.keywords.get("eps", 1e-5)
    if norm_layer is nn.LayerNorm:
        return 1e-5
    raise ValueError(f"norm_layer must be nn.LayerNorm or a partial of it, got {norm_layer!r}")


@dataclass(frozen=True)
class MAEConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = False
    norm_eps: float = 1e-6


# Named architectures. The first three are the paper's; the small ones serve tests, CPU demos and CI.
MODEL_ARCHS: dict[str, dict] = {
    "mae_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "mae_vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "mae_vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "mae_vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                                  decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    "mae_vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                                 decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    # 64 px images, 8 px patches (64 patches): the embedded CPU demo.
    "mae_vit_demo_patch8": dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3,
                                decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    # 32 px images, 4 px patches (64 patches): unit tests.
    "mae_vit_micro_patch4": dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                                 decoder_embed_dim=48, decoder_depth=1, decoder_num_heads=4),
}
_PAPER_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
NAMED_MODEL_NORM_EPS = 1e-6  # the reference's named constructors pass partial(nn.LayerNorm, eps=1e-6)


_MODEL_ALIASES = {  # the reference's long names
    "mae_vit_base_patch16_dec512d8b": "mae_vit_base_patch16",
    "mae_vit_large_patch16_dec512d8b": "mae_vit_large_patch16",
    "mae_vit_huge_patch14_dec512d8b": "mae_vit_huge_patch14",
}


def model_arch(name: str) -> dict:
    """The settings of a named architecture (MODEL_ARCHS, or a reference long name); ValueError naming
    the choices for an unknown one."""
    name = _MODEL_ALIASES.get(name, name)
    if name not in MODEL_ARCHS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODEL_ARCHS)}")
    return {**_PAPER_DECODER, "mlp_ratio": 4.0, "norm_eps": NAMED_MODEL_NORM_EPS, **MODEL_ARCHS[name]}


def create_model(name: str, **overrides) -> MaskedAutoencoderViT:
    """A named architecture (see MODEL_ARCHS); keyword arguments override its settings."""
    return MaskedAutoencoderViT(**{**model_arch(name), **overrides})


def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoderViT:
    return create_model("mae_vit_base_patch16", **kwargs)


def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoderViT:
    return create_model("mae_vit_large_patch16", **kwargs)


def mae_vit_huge_patch14(**kwargs) -> MaskedAutoencoderViT:
    return create_model("mae_vit_huge_patch14", **kwargs)


def mae_vit_tiny_patch16(**kwargs) -> MaskedAutoencoderViT:
    return create_model("mae_vit_tiny_patch16", **kwargs)


def mae_vit_micro_patch4(**kwargs) -> MaskedAutoencoderViT:
    return create_model("mae_vit_micro_patch4", **kwargs)


# The reference's names for the same constructors.
mae_vit_base_patch16_dec512d8b = mae_vit_base_patch16
mae_vit_large_patch16_dec512d8b = mae_vit_large_patch16
mae_vit_huge_patch14_dec512d8b = mae_vit_huge_patch14
