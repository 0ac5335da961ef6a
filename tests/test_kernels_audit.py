"""Tests from a mutation audit of the Triton kernels: the regimes tests/test_kernels.py leaves out.

Non-square images and non-contiguous (channels_last) images, patches gathered in several slabs,
grids of several programs, row tiles and column blocks (the GPU tiling, run through the
interpreter), low-variance patches and rows where eps matters, the roundings the references make
(F.linear's output, the rounded residual), and the launchers' checks on devices, index tensors and
shapes that test_kernels.py does not reach. Same rules: data movement exact, floating point within
twice PyTorch's own error against float64.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fastmae.kernels import decoder_input, patch_loss
from fastmae.kernels._launch import row_blocks
from fastmae.kernels.decoder_input import decoder_unshuffle_triton
from fastmae.kernels.encoder_input import gather_patch_rows, visible_patch_embed_reference, visible_patch_embed_triton
from fastmae.kernels.layer_norm import MAX_WIDTH, add_layer_norm_reference, add_layer_norm_triton
from fastmae.kernels.patch_loss import masked_patch_loss_reference, masked_patch_loss_triton
from fastmae.masking import random_masking
from fastmae.patches import patch_pixels
from test_kernels import (ATOL, DTYPES, _dyadic, assert_decoder_unshuffle_exact, assert_within_torch_error,  # noqa: F401
                          device)  # (fixture)

# (batch, channels, H, W, patch size, mask ratio or None: all patches, channels_last)
GATHER_CASES = {
    "wide": (2, 3, 16, 32, 4, 0.5, False),  # grid 4 x 8: rows and columns of patches differ
    "tall": (2, 3, 32, 16, 4, 0.5, False),
    "channels_last": (2, 3, 16, 32, 4, 0.5, True),  # s_w = C, not 1
    "one_channel": (2, 1, 16, 16, 4, 0.5, False),
    "p20_slabs": (2, 3, 40, 40, 20, 0.5, False),  # 32-lane rows, 8-row slabs: 3 slabs, the last half empty
    "p32_slabs": (1, 3, 64, 64, 32, None, False),  # 4 slabs per channel, no padding
    "p28_wide_cl": (2, 3, 56, 84, 28, 0.5, True),
    "many_rows": (2, 3, 224, 224, 14, None, False),  # 514 rows: several programs of 256
}


def _images(N, C, H, W, channels_last, device, dtype=torch.float32):
    imgs = torch.randn(N, C, H, W, device=device, dtype=dtype)
    return imgs.to(memory_format=torch.channels_last) if channels_last else imgs


def _patch_ids(N, L, ratio, device):
    return None if ratio is None else random_masking(N, L, ratio, device).ids_keep


# ---------------------------------------------------------------------------------------------
# Encoder input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(GATHER_CASES))
def test_patch_gather_layouts_are_exact(device, case):
    N, C, H, W, p, ratio, channels_last = GATHER_CASES[case]
    imgs = _images(N, C, H, W, channels_last, device)
    ids = _patch_ids(N, (H // p) * (W // p), ratio, device)
    expected = patch_pixels(imgs, p, ids)
    rows = gather_patch_rows(imgs, ids, p, torch.float32, expected.shape[-1]).view(N, -1, expected.shape[-1])
    assert not rows[:, 0].any()
    assert torch.equal(rows[:, 1:], expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_visible_patch_embed_several_tiles_non_square_channels_last(device, dtype):
    """104 rows x 72 channels: two row tiles and two column tiles of the GEMM (64 x 64 under the
    interpreter); a 4 x 10 patch grid of a channels_last image."""
    N, C, H, W, p, D = 4, 3, 16, 40, 4, 72
    L = (H // p) * (W // p)
    ids = random_masking(N, L, 0.4, device).ids_keep
    imgs = _images(N, C, H, W, True, device)
    params64 = dict(weight=torch.randn(D, C, p, p, device=device, dtype=torch.float64) / p,
                    bias=torch.randn(D, device=device, dtype=torch.float64),
                    cls_token=torch.randn(1, 1, D, device=device, dtype=torch.float64))
    pos = torch.randn(1, L + 1, D, device=device)
    grad_out = torch.randn(N, ids.shape[1] + 1, D, device=device)
    assert N * (ids.shape[1] + 1) > 64

    def run(fn, cast):
        params = {k: v.to(cast).requires_grad_() for k, v in params64.items()}
        out = fn(imgs.to(cast), ids, params["weight"], params["bias"], pos.to(cast), params["cls_token"], p)
        return [out, *torch.autograd.grad(out, list(params.values()), grad_out.to(out.dtype))]

    ours, at_dtype, ref64 = run(visible_patch_embed_triton, dtype), run(visible_patch_embed_reference, dtype), \
        run(visible_patch_embed_reference, torch.float64)
    for name, a, b, r in zip(["out", "d weight", "d bias", "d cls"], ours, at_dtype, ref64):
        assert a.dtype == b.dtype and a.shape == r.shape, name
        assert_within_torch_error(name, a, b, r, ATOL[dtype] * r.abs().max().item())


def test_visible_patch_embed_rounds_projection_like_f_linear(device):
    """Under bf16 autocast F.linear rounds the projection to bf16 before the fp32 pos-embed add.
    Dyadic inputs make every sum exact in fp32 in any order, so the kernel's output must equal the
    reference's bit for bit: a projection left in fp32 (one rounding fewer) shows."""
    N, img, p, D = 2, 16, 4, 24
    L = (img // p) ** 2
    ids = random_masking(N, L, 0.5, device).ids_keep
    imgs = _dyadic(N, 3, img, img, device=device)
    w, b = _dyadic(D, 3, p, p, device=device), _dyadic(D, device=device)
    pos, cls = _dyadic(1, L + 1, D, device=device) / 64, _dyadic(1, 1, D, device=device)
    outs = []
    for fn in (visible_patch_embed_triton, visible_patch_embed_reference):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            outs.append(fn(imgs, ids, w, b, pos, cls, p))
    assert outs[0].dtype == outs[1].dtype == torch.float32
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------
# Decoder input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_dtype,param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_decoder_unshuffle_wide_and_many_rows_is_exact(device, x_dtype, param_dtype):
    """1040 channels: two column blocks of 1024; 580 rows: row tiles of 64, several programs, so the
    mask-token gradient is a sum of several programs' partial sums."""
    assert_decoder_unshuffle_exact(random_masking(4, 144, 0.75, device), 1040, x_dtype, param_dtype, device)


def test_decoder_unshuffle_gpu_tiling_is_exact(device, monkeypatch):
    """The GPU's tiles (4096 values: 64 rows of 64 channels, 8 tiles per program) through the
    interpreter: the row-tile loop and the mask-token partial sums of many programs."""
    monkeypatch.setattr(decoder_input, "row_blocks", functools.partial(row_blocks, interpreter_elements=4096))
    assert_decoder_unshuffle_exact(random_masking(3, 256, 0.75, device), 64, torch.float32, torch.float32, device)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------

# (batch, channels, H, W, patch size, channels_last)
LOSS_LAYOUTS = {"wide": (2, 3, 16, 32, 4, False), "tall": (2, 3, 32, 16, 4, False),
                "channels_last": (2, 3, 16, 32, 4, True), "one_channel": (2, 1, 16, 16, 4, False)}


@pytest.mark.parametrize("layout", sorted(LOSS_LAYOUTS))
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_patch_loss_image_layouts(device, layout, norm_pix):
    N, C, H, W, p, channels_last = LOSS_LAYOUTS[layout]
    masking = random_masking(N, (H // p) * (W // p), 0.75, device)
    imgs = _images(N, C, H, W, channels_last, device) * 2 + 0.5
    pred = torch.randn(N, masking.ids_masked.shape[1], p * p * C, device=device)
    _check_loss_against_fp64(pred, imgs, p, norm_pix, masking.ids_masked, None, torch.float32)


def _check_loss_against_fp64(pred, imgs, p, norm_pix, patch_ids, weight, dtype, grad_scale=1.0):
    def run(fn, cast):
        pred_ = pred.to(cast).requires_grad_()
        loss = fn(pred_, imgs.to(cast), p, norm_pix, patch_ids, weight)
        return loss, torch.autograd.grad(loss * grad_scale, pred_)[0]

    loss, grad = run(masked_patch_loss_triton, dtype)
    torch_loss, torch_grad = run(masked_patch_loss_reference, dtype)
    loss64, grad64 = run(masked_patch_loss_reference, torch.float64)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_within_torch_error("loss", loss, torch_loss, loss64, ATOL[dtype] * loss64.abs().item())
    assert_within_torch_error("d pred", grad, torch_grad, grad64, ATOL[dtype] * grad64.abs().max().item())


def test_masked_patch_loss_low_contrast_patches(device):
    """Flat patches (std ~1e-3, like sky): there eps = 1e-6 inside the sqrt decides the target."""
    N, img, p = 2, 16, 4
    masking = random_masking(N, (img // p) ** 2, 0.75, device)
    imgs = 0.3 + 1e-3 * torch.randn(N, 3, img, img, device=device)
    pred = torch.randn(N, (img // p) ** 2, p * p * 3, device=device)
    _check_loss_against_fp64(pred, imgs, p, True, None, masking.mask, torch.float32)


@pytest.mark.parametrize("gpu_tiling", [False, True])
def test_masked_patch_loss_many_programs(device, gpu_tiling, monkeypatch):
    """1024 rows: two interpreter programs of 512 rows, or (the GPU's tiling, run through the
    interpreter) programs of 8 tiles of 64 rows; the loss sums every program's partial sum."""
    if gpu_tiling:
        monkeypatch.setattr(patch_loss, "interpreting", lambda: False)
    N, img, p = 16, 32, 4
    masking = random_masking(N, (img // p) ** 2, 0.75, device)
    imgs = torch.randn(N, 3, img, img, device=device)
    pred = torch.randn(N, (img // p) ** 2, p * p * 3, device=device)
    _check_loss_against_fp64(pred, imgs, p, True, None, masking.mask, torch.float32, grad_scale=3.0)


def test_masked_patch_loss_non_contiguous_weight(device):
    """The weight may be strided (the launcher accepts it): here the transpose of a [M, N] mask."""
    N, img, p = 3, 16, 4
    L = (img // p) ** 2
    masking = random_masking(N, L, 0.75, device)
    weight = masking.mask.t().contiguous().t() * torch.linspace(0.5, 2.0, L, device=device)
    assert not weight.is_contiguous()
    imgs = torch.randn(N, 3, img, img, device=device)
    pred = torch.randn(N, L, p * p * 3, device=device)
    _check_loss_against_fp64(pred, imgs, p, False, None, weight, torch.float32)


# ---------------------------------------------------------------------------------------------
# Residual add + LayerNorm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_layer_norm_low_variance_rows(device, dtype):
    """Rows with variance ~1e-6, where eps = 1e-6 under the square root matters."""
    x = (0.25 + 1e-3 * torch.randn(3, 7, 40, device=device)).to(dtype)
    branch = (1e-3 * torch.randn(3, 7, 40, device=device)).to(dtype)
    weight, bias = 1 + 0.5 * torch.randn(40, device=device), 0.1 * torch.randn(40, device=device)
    outs = []
    for fn, cast in ((add_layer_norm_triton, None), (add_layer_norm_reference, None),
                     (add_layer_norm_reference, torch.float64)):
        args = [t if cast is None else t.to(cast) for t in (x, branch, weight, bias)]
        outs.append(fn(*args, 1e-6)[1])
    assert_within_torch_error("out", *outs, ATOL[dtype])


def test_add_layer_norm_normalises_the_rounded_residual(device):
    """bf16 stream written to an fp32 output: out is layer_norm of the residual it returns (rounded
    to bf16), not of the exact sum."""
    x = torch.randn(5, 40, device=device).bfloat16() * 2 + 0.5
    branch = torch.randn(5, 40, device=device).bfloat16()
    weight, bias = 1 + 0.5 * torch.randn(40, device=device), 0.1 * torch.randn(40, device=device)
    residual, out = add_layer_norm_triton(x, branch, weight, bias, 1e-6, torch.float32)
    expected = torch.nn.functional.layer_norm(residual.double(), (40,), weight.double(), bias.double(), 1e-6)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_add_layer_norm_at_max_width(device):
    x, w, b = torch.randn(1, MAX_WIDTH, device=device), torch.randn(MAX_WIDTH, device=device), \
        torch.randn(MAX_WIDTH, device=device)
    _, out = add_layer_norm_triton(x, None, w, b, 1e-6)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (MAX_WIDTH,), w, b, 1e-6), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def test_launchers_reject_more_bad_inputs(device):
    N, img, p, D = 2, 16, 4, 8
    L = (img // p) ** 2
    imgs = torch.randn(N, 3, img, img, device=device)
    masking = random_masking(N, L, 0.75, device)
    randn = functools.partial(torch.randn, device=device)
    w, b = randn(D, 3, p, p), randn(D)
    pos, cls = randn(1, L + 1, D), randn(1, 1, D)
    # another device than the images' (meta: no memory, no second GPU needed)
    with pytest.raises(ValueError, match=r"weight \(shape \[8, 3, 4, 4\]\) is on meta"):
        visible_patch_embed_triton(imgs, masking.ids_keep, w.to("meta"), b, pos, cls, p)
    with pytest.raises(ValueError, match=r"pred \(shape .*\) is on meta"):
        masked_patch_loss_triton(randn(N, L, 48).to("meta"), imgs, p, True)
    with pytest.raises(ValueError, match=r"mask_token \(shape .*\) is on meta"):
        decoder_unshuffle_triton(randn(N, masking.num_visible + 1, D), randn(1, 1, D).to("meta"),
                                 masking.ids_restore, pos)
    # patch ids: every other column of a row is not dense; more ids than patches
    ids_shuffle = torch.cat([masking.ids_keep, masking.ids_masked], dim=1)
    with pytest.raises(ValueError, match=r"ids_keep .*must be dense along its last dim"):
        visible_patch_embed_triton(imgs, ids_shuffle[:, ::2], w, b, pos, cls, p)
    with pytest.raises(ValueError, match=r"patch_ids .*must be dense along its last dim"):
        masked_patch_loss_triton(randn(N, L // 2, 48), imgs, p, True, ids_shuffle[:, ::2])
    with pytest.raises(ValueError, match=r"ids_keep shape \[2, 17\] picks more than the 16 patches"):
        visible_patch_embed_triton(imgs, torch.cat([ids_shuffle, ids_shuffle[:, :1]], 1), w, b, pos, cls, p)
    # an image beyond the kernels' 32-bit offsets inside one image (meta: no memory)
    huge = torch.empty(1, 3, 2**16, 2**16, device="meta")
    with pytest.raises(ValueError, match=r"beyond the kernels' 32-bit offsets"):
        masked_patch_loss_triton(torch.empty(1, (2**16 // p) ** 2, 48, device="meta"), huge, p, False)
    # shapes and dtypes test_kernels.py does not try
    with pytest.raises(ValueError, match=r"cls_token must have shape \[1, 1, 8\], got \[1, 1, 9\]"):
        visible_patch_embed_triton(imgs, masking.ids_keep, w, b, pos, randn(1, 1, D + 1), p)
    x = randn(N, masking.num_visible + 1, D)
    with pytest.raises(ValueError, match=r"ids_restore .*dtype"):
        decoder_unshuffle_triton(x, randn(1, 1, D), masking.ids_restore.int(), pos)
    with pytest.raises(ValueError, match=r"ids_restore .*must be contiguous"):
        decoder_unshuffle_triton(x, randn(1, 1, D), masking.ids_restore.t().contiguous().t(), pos)
    with pytest.raises(ValueError, match=r"pred \(shape \[2, 16, 48\], strides .*\) must be contiguous"):
        masked_patch_loss_triton(randn(N, 48, L).transpose(1, 2), imgs, p, True)
    with pytest.raises(ValueError, match=r"bias must have shape \[8\], got \[9\]"):
        add_layer_norm_triton(randn(N, 5, D), None, randn(D), randn(D + 1), 1e-6)
