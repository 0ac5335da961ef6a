"""The Triton kernels against their PyTorch references (CPU: Triton interpreter; GPU: marked gpu).

Data movement (patch gather, unshuffle) must be bit-identical. Floating-point results (patch
projection, loss) are compared with a float64 reference: the kernel's error may be at most twice
PyTorch's own error at the same precision, plus a small atol.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

import fastmae.kernels as ops
from fastmae.kernels._launch import interpreting
from fastmae.kernels.decoder_input import (DecoderUnshuffle, DecoderUnshuffleEager, decoder_unshuffle_reference,
                                           decoder_unshuffle_triton)
from fastmae.kernels.encoder_input import (
    VisiblePatchEmbed,
    VisiblePatchEmbedEager,
    gather_patch_rows,
    visible_patch_embed_reference,
    visible_patch_embed_triton,
)
from fastmae.kernels import layer_norm as layer_norm_kernels
from fastmae.kernels.layer_norm import MAX_WIDTH, AddLayerNormEager, add_layer_norm_reference, add_layer_norm_triton
from fastmae.kernels.patch_loss import MaskedPatchLossEager, masked_patch_loss_reference, masked_patch_loss_triton
from fastmae.masking import random_masking
from fastmae.models import create_model
from fastmae.patches import patch_pixels
from fastmae.vit import Block, forward_blocks

# CPU runs the kernels through the Triton interpreter, which conftest switches on only without CUDA.
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreting(), reason="Triton on CPU needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}

# (batch, image size, patch size, width, mask ratio): odd shapes on purpose. 224 px / 14 px patches
# is ViT-H's grid, L = 256; K = 25 or 16 is no multiple of any block; widths are not powers of two.
SHAPES = {
    "micro": (2, 32, 4, 64, 0.75),
    "vith_grid": (1, 224, 14, 40, 0.9),
    "odd": (3, 24, 4, 24, 0.6),
}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def _masking(batch, img, patch, ratio, device):
    return random_masking(batch, (img // patch) ** 2, ratio, device)


def _dyadic(*shape, device, dtype=torch.float32):
    """Random multiples of 1/8 in [-4, 4): sums of a few thousand are exact in fp32 in any order."""
    return (torch.randint(-32, 32, shape, device=device).to(dtype) / 8).to(dtype)


def assert_within_torch_error(name, ours, torch_at_dtype, ref64, atol):
    """|ours - fp64| <= 2 |torch at the same dtype - fp64| + atol (max over elements)."""
    err_ours = (ours.double() - ref64).abs().max().item()
    err_torch = (torch_at_dtype.double() - ref64).abs().max().item()
    assert err_ours <= 2 * err_torch + atol, f"{name}: error {err_ours:.3g} > 2 x torch's {err_torch:.3g} + {atol:g}"


# ---------------------------------------------------------------------------------------------
# Encoder input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["micro", "vith_grid"])
@pytest.mark.parametrize("keep", ["visible", "all"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_gather_is_exact(device, dtype, keep, shape):
    N, img, p, _, ratio = SHAPES[shape]
    imgs = torch.randn(N, 3, img, img, device=device)
    ids = _masking(N, img, p, ratio, device).ids_keep if keep == "visible" else None
    expected = patch_pixels(imgs, p, ids).to(dtype)
    rows = gather_patch_rows(imgs, ids, p, dtype, expected.shape[-1])
    rows = rows.view(N, -1, expected.shape[-1])
    assert torch.equal(rows[:, 0], torch.zeros_like(rows[:, 0]))  # where cls sits
    assert torch.equal(rows[:, 1:], expected)


def test_patch_gather_pads_rows_with_zeros(device):
    """The GEMM's A operand: rows padded to a multiple of 64 values (ViT-H: 588 -> 640) with zeros."""
    N, img, p, _, ratio = SHAPES["vith_grid"]
    imgs = torch.randn(N, 3, img, img, device=device)
    ids = _masking(N, img, p, ratio, device).ids_keep
    rows = gather_patch_rows(imgs, ids, p, torch.bfloat16, 640).view(N, -1, 640)
    expected = patch_pixels(imgs, p, ids).to(torch.bfloat16)
    assert torch.equal(rows[:, 1:, :588], expected)
    assert not rows[:, 1:, 588:].any() and not rows[:, 0].any()


@pytest.fixture(params=["triton", "cublas"])
def gemm_backend(request):
    """The encoder input's GEMM: Triton with the epilogue fused, or cuBLAS then an epilogue kernel."""
    from fastmae.kernels.encoder_input import _gemm_backend, gemm_route

    with gemm_route(request.param):
        assert _gemm_backend(1, 1, 1) == request.param
        yield request.param


def test_the_encoder_input_gemm_route_defaults_to_cublas_and_names_unknown_routes():
    from fastmae.kernels.encoder_input import _gemm_backend, gemm_route

    assert _gemm_backend(12800, 1024, 768) == "cublas"
    with pytest.raises(ValueError, match="unknown GEMM route 'cutlass'; choose from"):
        with gemm_route("cutlass"):
            pass
    with gemm_route("triton"):
        assert _gemm_backend(12800, 1024, 768) == "triton"
    assert _gemm_backend(12800, 1024, 768) == "cublas"


@pytest.mark.parametrize("shape", ["micro", "vith_grid", "odd"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_visible_patch_embed_matches_fp64(device, dtype, shape, gemm_backend):
    N, img, p, D, ratio = SHAPES[shape]
    L = (img // p) ** 2
    ids = _masking(N, img, p, ratio, device).ids_keep
    imgs = torch.randn(N, 3, img, img, device=device)
    params64 = dict(
        weight=torch.randn(D, 3, p, p, device=device, dtype=torch.float64) / p,
        bias=torch.randn(D, device=device, dtype=torch.float64),
        cls_token=torch.randn(1, 1, D, device=device, dtype=torch.float64),
    )
    pos = torch.randn(1, L + 1, D, device=device)
    grad_out = torch.randn(N, ids.shape[1] + 1, D, device=device)

    def run(fn, cast):
        params = {k: v.to(cast).requires_grad_() for k, v in params64.items()}
        out = fn(imgs.to(cast), ids, params["weight"], params["bias"], pos.to(cast), params["cls_token"], p)
        grads = torch.autograd.grad(out, list(params.values()), grad_out.to(out.dtype))
        return [out, *grads]

    ours = run(visible_patch_embed_triton, dtype)
    at_dtype = run(visible_patch_embed_reference, dtype)
    ref64 = run(visible_patch_embed_reference, torch.float64)
    assert ours[0].dtype == at_dtype[0].dtype and ours[0].shape == ref64[0].shape
    for name, a, b, r in zip(["out", "d weight", "d bias", "d cls"], ours, at_dtype, ref64):
        assert a.dtype == b.dtype
        assert_within_torch_error(name, a, b, r, ATOL[dtype] * r.abs().max().item())


def test_visible_patch_embed_all_patches_and_autocast(device, gemm_backend):
    """ids_keep None (the naive baseline) and bf16 autocast: the reference's dtypes and numbers."""
    N, img, p, D, _ = SHAPES["micro"]
    L = (img // p) ** 2
    imgs = torch.randn(N, 3, img, img, device=device)
    w = torch.randn(D, 3, p, p, device=device, requires_grad=True)
    b = torch.randn(D, device=device, requires_grad=True)
    pos, cls = torch.randn(1, L + 1, D, device=device), torch.randn(1, 1, D, device=device, requires_grad=True)
    results = []
    for fn in (visible_patch_embed_triton, visible_patch_embed_reference):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = fn(imgs, None, w, b, pos, cls, p)
        results.append([out, *torch.autograd.grad(out.sum(), (w, b, cls))])
    for ours, theirs in zip(*results):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        # same bf16 roundings, only the GEMM's summation order differs
        torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=2e-2 * theirs.abs().max().item())
    assert results[0][0].shape == (N, L + 1, D) and results[0][0].dtype == torch.float32


def test_visible_patch_embed_image_and_pos_grads(device):
    """imgs and pos_embed need no gradient in MAE, but one asked for is right."""
    N, img, p, D, ratio = SHAPES["odd"]
    L = (img // p) ** 2
    ids = _masking(N, img, p, ratio, device).ids_keep
    inputs = [torch.randn(N, 3, img, img, device=device), torch.randn(D, 3, p, p, device=device),
              torch.randn(D, device=device), torch.randn(1, L + 1, D, device=device), torch.randn(1, 1, D, device=device)]
    grads = []
    for fn in (visible_patch_embed_triton, visible_patch_embed_reference):
        leaves = [t.clone().requires_grad_() for t in inputs]
        imgs, w, b, pos, cls = leaves
        out = fn(imgs, ids, w, b, pos, cls, p)
        grads.append(torch.autograd.grad((out * out).sum(), leaves))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Decoder input
# ---------------------------------------------------------------------------------------------

# (x dtype, mask_token and pos dtype): one dtype throughout, and autocast's bf16 x with fp32 params
UNSHUFFLE_DTYPES = [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("shape", ["micro", "vith_grid", "odd"])
@pytest.mark.parametrize("x_dtype,param_dtype", UNSHUFFLE_DTYPES)
def test_decoder_unshuffle_is_exact(device, x_dtype, param_dtype, shape):
    N, img, p, D, ratio = SHAPES[shape]
    assert_decoder_unshuffle_exact(_masking(N, img, p, ratio, device), D, x_dtype, param_dtype, device)


def assert_decoder_unshuffle_exact(masking, D, x_dtype, param_dtype, device):
    """Output, d x and d mask_token of the kernel bit-equal to the reference's on dyadic values."""
    N, L, K = masking.ids_restore.shape[0], masking.ids_restore.shape[1], masking.num_visible
    x = _dyadic(N, K + 1, D, device=device, dtype=x_dtype)
    mask_token = _dyadic(1, 1, D, device=device, dtype=param_dtype)
    pos = _dyadic(1, L + 1, D, device=device, dtype=param_dtype)
    grad_out = None
    results = []
    for fn in (decoder_unshuffle_triton, decoder_unshuffle_reference):
        xs, mt = x.clone().requires_grad_(), mask_token.clone().requires_grad_()
        out = fn(xs, mt, masking.ids_restore, pos)
        grad_out = _dyadic(*out.shape, device=device, dtype=out.dtype) if grad_out is None else grad_out
        results.append([out, *torch.autograd.grad(out, (xs, mt), grad_out)])
    for name, ours, theirs in zip(["out", "d x", "d mask_token"], *results):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
        assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("x_dtype,param_dtype", UNSHUFFLE_DTYPES)
def test_decoder_unshuffle_random_values_and_pos_grad(device, x_dtype, param_dtype):
    """Random values (every rounding to bf16/fp16 is exercised): output and d x stay exact, the
    mask-token and pos sums agree to round-off."""
    N, img, p, D, ratio = SHAPES["micro"]
    masking = _masking(N, img, p, ratio, device)
    L, K = masking.ids_restore.shape[1], masking.num_visible
    inputs = [torch.randn(N, K + 1, D, device=device, dtype=x_dtype), torch.randn(1, 1, D, device=device, dtype=param_dtype),
              torch.randn(1, L + 1, D, device=device, dtype=param_dtype)]
    results = []
    for fn in (decoder_unshuffle_triton, decoder_unshuffle_reference):
        x, mt, pos = [t.clone().requires_grad_() for t in inputs]
        out = fn(x, mt, masking.ids_restore, pos)
        results.append([out, *torch.autograd.grad((out * out).sum(), (x, mt, pos))])
    (out, dx, dmt, dpos), (rout, rdx, rdmt, rdpos) = results
    assert torch.equal(out, rout) and torch.equal(dx, rdx)
    tol = 1e-5 if param_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(dmt, rdmt, rtol=tol, atol=tol)
    torch.testing.assert_close(dpos, rdpos, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["micro", "vith_grid", "odd"])
@pytest.mark.parametrize("rows", ["full_pred_mask", "removed_only", "all_unweighted"])
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_patch_loss_matches_fp64(device, dtype, norm_pix, rows, shape):
    N, img, p, _, ratio = SHAPES[shape]
    masking = _masking(N, img, p, ratio, device)
    L = masking.ids_restore.shape[1]
    patch_ids, weight = {"full_pred_mask": (None, masking.mask), "removed_only": (masking.ids_masked, None),
                         "all_unweighted": (None, None)}[rows]
    M = L if patch_ids is None else patch_ids.shape[1]
    imgs = torch.randn(N, 3, img, img, device=device) * 2 + 0.5
    pred = torch.randn(N, M, p * p * 3, device=device)

    def run(fn, cast):
        pred_ = pred.to(cast).requires_grad_()
        loss = fn(pred_, imgs.to(cast), p, norm_pix, patch_ids, weight)
        return loss, torch.autograd.grad(loss, pred_)[0]

    loss, grad = run(masked_patch_loss_triton, dtype)
    torch_loss, torch_grad = run(masked_patch_loss_reference, dtype)
    loss64, grad64 = run(masked_patch_loss_reference, torch.float64)
    assert loss.dtype == torch.float32 and loss.shape == () and grad.dtype == dtype
    assert_within_torch_error("loss", loss, torch_loss, loss64, ATOL[dtype] * loss64.abs().item())
    assert_within_torch_error("d pred", grad, torch_grad, grad64, ATOL[dtype] * grad64.abs().max().item())


def test_masked_patch_loss_autocast_dtypes_and_grad_scaling(device):
    """bf16 pred with fp32 images (autocast training), a non-unit incoming gradient."""
    N, img, p, _, ratio = SHAPES["micro"]
    masking = _masking(N, img, p, ratio, device)
    imgs = torch.randn(N, 3, img, img, device=device)
    pred = torch.randn(N, masking.ids_masked.shape[1], p * p * 3, device=device).bfloat16()
    results = []
    for fn in (masked_patch_loss_triton, masked_patch_loss_reference):
        pred_ = pred.clone().requires_grad_()
        loss = fn(pred_, imgs, p, True, masking.ids_masked, None)
        results.append((loss, torch.autograd.grad(loss * 3.0, pred_)[0]))
    (loss, grad), (rloss, rgrad) = results
    torch.testing.assert_close(loss, rloss.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, rgrad, rtol=1e-2, atol=1e-4)


def test_masked_patch_loss_fp16_gradient_at_training_sizes(device):
    """fp16 with a GradScaler-sized incoming gradient, 12,288 removed patches: d(loss)/d(pred) before
    that factor (about 3e-6 here, 7e-8 for ViT-B at batch 256) is below fp16's normal range, so the
    kernel must apply both scales in fp32 and round once, as autograd of the reference does."""
    N, img, p = 256, 32, 4
    masking = _masking(N, img, p, 0.75, device)
    imgs = torch.randn(N, 3, img, img, device=device)
    pred = torch.randn(N, masking.ids_masked.shape[1], p * p * 3, device=device)
    scale = 65536.0  # GradScaler's initial scale

    def grad(fn, dtype):  # as under fp16 autocast: a half-precision head, fp32 images, an fp32 loss
        pred_ = pred.to(dtype).requires_grad_()
        loss = fn(pred_, imgs.to(torch.promote_types(dtype, torch.float32)), p, True, masking.ids_masked, None)
        return torch.autograd.grad(loss * scale, pred_)[0]

    ours, theirs = grad(masked_patch_loss_triton, torch.float16), grad(masked_patch_loss_reference, torch.float16)
    ref64 = grad(masked_patch_loss_reference, torch.float64)
    assert_within_torch_error("d pred", ours, theirs, ref64, ATOL[torch.float16] * ref64.abs().max().item())


def test_masked_patch_loss_image_and_weight_grads(device):
    N, img, p, _, ratio = SHAPES["odd"]
    masking = _masking(N, img, p, ratio, device)
    L = masking.ids_restore.shape[1]
    inputs = [torch.randn(N, L, p * p * 3, device=device), torch.randn(N, 3, img, img, device=device),
              masking.mask + 0.5]
    grads = []
    for fn in (masked_patch_loss_triton, masked_patch_loss_reference):
        pred, imgs, weight = [t.clone().requires_grad_() for t in inputs]
        loss = fn(pred, imgs, p, True, None, weight)
        grads.append(torch.autograd.grad(loss, (pred, imgs, weight)))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_masked_patch_loss_without_grad(device):
    N, img, p, _, ratio = SHAPES["micro"]
    masking = _masking(N, img, p, ratio, device)
    imgs = torch.randn(N, 3, img, img, device=device)
    pred = torch.randn(N, masking.ids_restore.shape[1], p * p * 3, device=device)
    with torch.no_grad():
        loss = masked_patch_loss_triton(pred, imgs, p, False, None, masking.mask)
    torch.testing.assert_close(loss, masked_patch_loss_reference(pred, imgs, p, False, None, masking.mask))


# ---------------------------------------------------------------------------------------------
# Residual add + LayerNorm
# ---------------------------------------------------------------------------------------------

# (x dtype, branch dtype or None: norm alone, out dtype): one dtype throughout, and the bf16 autocast
# setting (fp32 residual stream, bf16 sub-block output, bf16 for the next Linear)
NORM_DTYPES = [(d, b, d) for d in DTYPES for b in (d, None)] + [
    (torch.float32, torch.bfloat16, torch.bfloat16), (torch.float32, None, torch.bfloat16)]
# (leading dims, D): rows no multiple of any tile, widths that are not powers of two, ViT-H's 1280;
# "many_rows" makes backward programs walk several tiles, the last one past the end
NORM_SHAPES = {"odd": ((3, 7), 40), "pow2": ((2, 17), 64), "one_row": ((1,), 24), "vith": ((2, 3), 1280),
               "many_rows": ((5, 53), 40)}


def _add_layer_norm_inputs(lead, D, x_dtype, branch_dtype, device):
    x = torch.randn(*lead, D, device=device).to(x_dtype) * 2 + 0.5  # an offset: the mean matters
    branch = None if branch_dtype is None else torch.randn(*lead, D, device=device).to(branch_dtype)
    weight, bias = 1 + 0.5 * torch.randn(D, device=device), 0.1 * torch.randn(D, device=device)
    return x, branch, weight, bias


def _add_layer_norm_run(fn, inputs, out_dtype, upstream, cast=None):
    """fn's (residual, out) and the gradients of sum(residual * g_res) + sum(out * g_out) for x,
    branch, weight, bias; ``cast`` turns every input (and upstream gradient) into another dtype."""
    leaves = [None if t is None else (t if cast is None else t.to(cast)).detach().requires_grad_() for t in inputs]
    residual, out = fn(*leaves, 1e-6, out_dtype if cast is None else cast)
    g_res, g_out = upstream
    terms = [(out * (g_out if cast is None else g_out.to(cast))).sum()] if g_out is not None else []
    if g_res is not None and leaves[1] is not None:
        terms.append((residual * (g_res if cast is None else g_res.to(cast))).sum())
    wrt = [t for t in leaves if t is not None]
    return residual, out, torch.autograd.grad(sum(terms), wrt, allow_unused=True)


@pytest.mark.parametrize("shape", sorted(NORM_SHAPES))
@pytest.mark.parametrize("x_dtype,branch_dtype,out_dtype", NORM_DTYPES)
def test_add_layer_norm_matches_fp64(device, x_dtype, branch_dtype, out_dtype, shape):
    lead, D = NORM_SHAPES[shape]
    _check_add_layer_norm_against_fp64(lead, D, x_dtype, branch_dtype, out_dtype, device)


def _check_add_layer_norm_against_fp64(lead, D, x_dtype, branch_dtype, out_dtype, device):
    """The residual equals PyTorch's add; out and every gradient are within 2x PyTorch's error."""
    inputs = _add_layer_norm_inputs(lead, D, x_dtype, branch_dtype, device)
    residual_dtype = x_dtype if branch_dtype is None else torch.promote_types(x_dtype, branch_dtype)
    upstream = (torch.randn(*lead, D, device=device).to(residual_dtype), torch.randn(*lead, D, device=device).to(out_dtype))
    res, out, grads = _add_layer_norm_run(add_layer_norm_triton, inputs, out_dtype, upstream)
    t_res, t_out, t_grads = _add_layer_norm_run(add_layer_norm_reference, inputs, out_dtype, upstream)
    _, r_out, r_grads = _add_layer_norm_run(add_layer_norm_reference, inputs, out_dtype, upstream, cast=torch.float64)
    assert res.dtype == residual_dtype and out.dtype == out_dtype
    assert torch.equal(res, t_res)  # the add rounds once, like PyTorch's
    atol = ATOL[out_dtype]
    assert_within_torch_error("out", out, t_out, r_out, atol)
    names = ["d x", "d branch", "d weight", "d bias"] if branch_dtype is not None else ["d x", "d weight", "d bias"]
    for name, ours, theirs, ref in zip(names, grads, t_grads, r_grads):
        assert ours.dtype == theirs.dtype, name
        # weight and bias gradients are sums over rows: scale the atol with their number
        scale = res.numel() // D if name in ("d weight", "d bias") else 1
        assert_within_torch_error(name, ours, theirs, ref, ATOL[ours.dtype] * scale)


def test_add_layer_norm_reference_hands_layer_norm_one_dtype(monkeypatch):
    """CUDA's LayerNorm refuses fp32 parameters beside a bf16 input, which CPU's accepts: the reference
    computes such mixes in fp32 itself and rounds once, giving the CPU kernel's numbers."""
    x, weight, bias = torch.randn(6, 40, dtype=torch.bfloat16), torch.randn(40), torch.randn(40)
    cpu_mixed = torch.nn.functional.layer_norm(x, (40,), weight, bias, 1e-6)
    layer_norm = torch.nn.functional.layer_norm

    def one_dtype(inp, shape, w, b, eps):
        assert inp.dtype == w.dtype == b.dtype, "CUDA: expected scalar type BFloat16 but found Float"
        return layer_norm(inp, shape, w, b, eps)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", one_dtype)
    residual, out = add_layer_norm_reference(x, None, weight, bias, 1e-6)
    assert residual is x and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, cpu_mixed, rtol=8e-3, atol=8e-3)  # one bf16 rounding apart at most


@pytest.mark.parametrize("used", ["out_only", "residual_only"])
def test_add_layer_norm_one_output_used(device, used):
    """An unused output's gradient reaches backward as None (the op does not materialise zeros)."""
    inputs = _add_layer_norm_inputs((2, 5), 24, torch.float32, torch.float32, device)
    g = torch.randn(2, 5, 24, device=device)
    upstream = (None, g) if used == "out_only" else (g, None)
    _, _, grads = _add_layer_norm_run(add_layer_norm_triton, inputs, None, upstream)
    _, _, ref_grads = _add_layer_norm_run(add_layer_norm_reference, inputs, None, upstream)
    for ours, ref in zip(grads, ref_grads):
        if ref is None:  # weight and bias when only the residual is used
            assert ours is None or not ours.any()
        else:
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16])
def test_add_layer_norm_parameter_gradients_in_their_own_dtypes(device, weight_dtype):
    """A bf16 or fp16 weight beside an fp32 bias: the bias gradient keeps fp32's precision (it was rounded
    through the weight's dtype: 3.0 off for a sum of 64 gradients of about 100 with a bf16 weight)."""
    x = torch.randn(64, 24, device=device)
    weight = torch.randn(24, device=device).to(weight_dtype).requires_grad_()
    bias = torch.randn(24, device=device, requires_grad=True)
    g = torch.randn(64, 24, device=device) * 100
    _, out = add_layer_norm_triton(x, None, weight, bias, 1e-5)
    out.backward(g.to(out.dtype))
    assert weight.grad.dtype == weight_dtype and bias.grad.dtype == torch.float32
    exact = g.double().sum(0)  # d(sum(out * g)) / d(bias)
    assert (bias.grad.double() - exact).abs().max() < 1e-2


@pytest.mark.parametrize("branch_dtype", [None, torch.float32, torch.bfloat16])
def test_add_layer_norm_of_no_rows(device, branch_dtype):
    inputs = _add_layer_norm_inputs((0, 5), 8, torch.float32, branch_dtype, device)
    g = torch.randn(0, 5, 8, device=device)
    res, out, grads = _add_layer_norm_run(add_layer_norm_triton, inputs, None, (g, g))
    _, ref_out, ref_grads = _add_layer_norm_run(add_layer_norm_reference, inputs, None, (g, g))
    assert res.shape == out.shape == (0, 5, 8)
    for ours, ref in zip(grads, ref_grads):
        assert ours.shape == ref.shape and ours.dtype == ref.dtype and not ours.any()


@pytest.mark.gpu
def test_add_layer_norm_many_rows_per_program_on_gpu():
    """Real sizes: programs walk ~10 one-row tiles each (tests with a few hundred rows give one)."""
    _check_add_layer_norm_against_fp64((40, 257), 768, torch.float32, torch.bfloat16, torch.bfloat16,
                                       torch.device("cuda"))


def test_add_layer_norm_without_branch_returns_x(device):
    x, _, weight, bias = _add_layer_norm_inputs((2, 3), 16, torch.float32, None, device)
    residual, out = add_layer_norm_triton(x, None, weight, bias, 1e-6)
    assert residual is x
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (16,), weight, bias, 1e-6))


# ---------------------------------------------------------------------------------------------
# Validation, registration, torch.compile
# ---------------------------------------------------------------------------------------------


def test_launchers_reject_bad_inputs(device):
    N, img, p, D = 2, 16, 4, 8
    L = (img // p) ** 2
    imgs = torch.randn(N, 3, img, img, device=device)
    masking = random_masking(N, L, 0.75, device)
    w, b = torch.randn(D, 3, p, p, device=device), torch.randn(D, device=device)
    pos, cls = torch.randn(1, L + 1, D, device=device), torch.randn(1, 1, D, device=device)
    randn = functools.partial(torch.randn, device=device)
    with pytest.raises(ValueError, match=r"pos_embed must have shape \[1, 17, 8\], got \[1, 16, 8\]"):
        visible_patch_embed_triton(imgs, masking.ids_keep, w, b, pos[:, 1:], cls, p)
    with pytest.raises(ValueError, match=r"H and W must be multiples of patch_size 4"):
        visible_patch_embed_triton(imgs[..., :15], masking.ids_keep, w, b, pos, cls, p)
    with pytest.raises(ValueError, match=r"ids_keep .*dtype"):
        visible_patch_embed_triton(imgs, masking.ids_keep.int(), w, b, pos, cls, p)
    with pytest.raises(ValueError, match=r"bias .*dtype"):
        visible_patch_embed_triton(imgs, masking.ids_keep, w, b.half(), pos, cls, p)
    with pytest.raises(ValueError, match=r"weight .*shape \[\*, \*, 4, 4\]"):
        visible_patch_embed_triton(imgs, masking.ids_keep, w[..., :2], b, pos, cls, p)
    x = randn(N, masking.num_visible + 1, D)
    with pytest.raises(ValueError, match=r"mask_token must have shape \[1, 1, 8\]"):
        decoder_unshuffle_triton(x, randn(1, 1, D + 1), masking.ids_restore, pos)
    with pytest.raises(ValueError, match=r"x \(shape \[2, 5, 8\], strides .*\) must be contiguous"):
        decoder_unshuffle_triton(x.transpose(0, 1).contiguous().transpose(0, 1), randn(1, 1, D), masking.ids_restore, pos)
    with pytest.raises(ValueError, match=r"x shape \[2, 18, 8\]"):
        decoder_unshuffle_triton(randn(N, L + 2, D), randn(1, 1, D), masking.ids_restore, pos)
    with pytest.raises(ValueError, match=r"x .*dtype"):
        decoder_unshuffle_triton(x.double(), randn(1, 1, D), masking.ids_restore, pos)
    pred = randn(N, L, p * p * 3)
    with pytest.raises(ValueError, match=r"pred must have shape \[2, \*, 48\], got \[2, 16, 47\]"):
        masked_patch_loss_triton(pred[..., :47], imgs, p, True)
    with pytest.raises(ValueError, match=r"without patch_ids it must hold all L = 16"):
        masked_patch_loss_triton(pred[:, :4].contiguous(), imgs, p, True)
    with pytest.raises(ValueError, match=r"patch_ids shape \[2, 4\] does not match pred shape \[2, 16, 48\]"):
        masked_patch_loss_triton(pred, imgs, p, True, masking.ids_keep)
    with pytest.raises(ValueError, match=r"weight must have shape \[2, 16\]"):
        masked_patch_loss_triton(pred, imgs, p, True, None, masking.mask[:, :3])
    with pytest.raises(ValueError, match=r"imgs must be \[N, C, H, W\]"):
        masked_patch_loss_triton(pred, imgs[0], p, True)
    x, w = randn(N, 5, D), randn(D)
    with pytest.raises(ValueError, match=r"branch must have shape \[2, 5, 8\], got \[2, 4, 8\]"):
        add_layer_norm_triton(x, randn(N, 4, D), w, w, 1e-6)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\], got \[9\]"):
        add_layer_norm_triton(x, None, randn(D + 1), w, 1e-6)
    with pytest.raises(ValueError, match=r"out_dtype must be one of"):
        add_layer_norm_triton(x, None, w, w, 1e-6, torch.float64)
    with pytest.raises(ValueError, match=r"branch \(shape \[2, 5, 8\], strides .*\) must be contiguous"):
        add_layer_norm_triton(x, randn(N, D, 5).transpose(1, 2), w, w, 1e-6)
    with pytest.raises(ValueError, match=rf"D <= {MAX_WIDTH}"):
        add_layer_norm_triton(randn(1, MAX_WIDTH + 1), None, randn(MAX_WIDTH + 1), randn(MAX_WIDTH + 1), 1e-6)


def test_launchers_check_index_values_on_the_cpu():
    """Where reading them back costs nothing (the interpreter), ids that would read or write other rows'
    memory are refused; the references would raise an IndexError for them too."""
    if not interpreting():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    N, img, p, D = 2, 16, 4, 8
    L = (img // p) ** 2
    imgs, masking = torch.randn(N, 3, img, img), random_masking(N, L, 0.75, torch.device("cpu"))
    w, b, pos, cls = torch.randn(D, 3, p, p), torch.randn(D), torch.randn(1, L + 1, D), torch.randn(1, 1, D)
    for bad in (L, -1, 10**8):
        ids = masking.ids_keep.clone()
        ids[1, 2] = bad
        with pytest.raises(ValueError, match=rf"ids_keep holds patch ids from -?\d+ to \d+, outside 0..{L - 1}"):
            visible_patch_embed_triton(imgs, ids, w, b, pos, cls, p)
        with pytest.raises(ValueError, match=rf"patch_ids holds patch ids .* outside 0..{L - 1}"):
            masked_patch_loss_triton(torch.randn(N, ids.shape[1], p * p * 3), imgs, p, True, ids)
    x, mask_token = torch.randn(N, masking.num_visible + 1, D), torch.randn(1, 1, D)
    repeated = masking.ids_restore.clone()
    repeated[0, 1] = repeated[0, 0]
    for ids_restore in (repeated, masking.ids_restore - 1):
        with pytest.raises(ValueError, match=rf"ids_restore must hold a permutation of 0..{L - 1} in every row"):
            decoder_unshuffle_triton(x, mask_token, ids_restore, pos)


def test_second_derivatives_through_the_kernels_raise(device):
    """create_graph=True through a kernel raises at once, naming kernels='torch': with torch's
    once_differentiable, autograd.grad(..., allow_unused=True) had returned None (zero) for it."""
    x, w, b = (torch.randn(4, 8, device=device, requires_grad=True), torch.randn(8, device=device),
               torch.randn(8, device=device))
    _, out = add_layer_norm_triton(x, None, w, b, 1e-6)
    with pytest.raises(RuntimeError, match="no second derivative .* kernels='torch'"):
        torch.autograd.grad((out ** 3).sum(), x, create_graph=True)
    _, out = add_layer_norm_triton(x, None, w, b, 1e-6)
    (grad,) = torch.autograd.grad((out ** 3).sum(), x)  # a first derivative as before
    _, ref = add_layer_norm_reference(x, None, w, b, 1e-6)
    torch.testing.assert_close(grad, torch.autograd.grad((ref ** 3).sum(), x)[0], rtol=1e-4, atol=1e-4)


def _tiny_op_inputs(device):
    N, img, p, D = 2, 16, 4, 8
    L = (img // p) ** 2
    masking = random_masking(N, L, 0.75, device)
    imgs = torch.randn(N, 3, img, img, device=device)
    leaf = lambda *s: torch.randn(*s, device=device, requires_grad=True)  # noqa: E731
    pos = torch.randn(1, L + 1, D, device=device)
    return [
        ("visible_patch_embed", (imgs, masking.ids_keep, leaf(D, 3, p, p), leaf(D), pos, leaf(1, 1, D), p)),
        ("visible_patch_embed", (imgs, None, leaf(D, 3, p, p), leaf(D), pos, leaf(1, 1, D), p)),
        ("decoder_unshuffle", (leaf(N, masking.num_visible + 1, D), leaf(1, 1, D), masking.ids_restore, pos)),
        ("decoder_unshuffle_backward", (torch.randn(N, L + 1, D, device=device), masking.ids_restore, masking.num_visible,
                                        torch.float32, torch.float32)),
        ("masked_patch_loss", (leaf(N, L, 48), imgs, p, True, None, masking.mask, True)),
        ("masked_patch_loss", (leaf(N, L - 4, 48), imgs, p, False, masking.ids_masked, None, True)),
        ("add_layer_norm", (leaf(N, 5, D), leaf(N, 5, D), leaf(D), leaf(D), 1e-6, torch.float32)),
        ("add_layer_norm", (leaf(N, 5, D), None, leaf(D), leaf(D), 1e-6, torch.bfloat16)),
        ("add_layer_norm", (leaf(N, 5, D), leaf(N, 5, D).bfloat16(), leaf(D), leaf(D), 1e-6, torch.bfloat16)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_custom_ops_registered_and_pass_opcheck(device, case):
    name, args = _tiny_op_inputs(device)[case]
    op = getattr(torch.ops.fastmae, name)
    torch.library.opcheck(op, args)  # schema, fake tensor, autograd registration, AOT dispatch


def test_autograd_functions_equal_custom_ops(device):
    (_, embed_args), _, (_, unshuffle_args), *_ = _tiny_op_inputs(device)
    for fn, op, args in [(VisiblePatchEmbed, torch.ops.fastmae.visible_patch_embed, embed_args),
                         (DecoderUnshuffle, torch.ops.fastmae.decoder_unshuffle, unshuffle_args)]:
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        out_fn, out_op = fn.apply(*args), op(*args)
        if isinstance(out_op, tuple):  # visible_patch_embed also returns the gathered patches, kept for backward
            assert all(torch.equal(a, b) for a, b in zip(out_fn, out_op))
            out_fn, out_op = out_fn[0], out_op[0]
        assert torch.equal(out_fn, out_op)
        for g_fn, g_op in zip(torch.autograd.grad(out_fn.sum(), leaves), torch.autograd.grad(out_op.sum(), leaves)):
            assert torch.equal(g_fn, g_op)


EAGER_FUNCTIONS = {"visible_patch_embed": VisiblePatchEmbedEager, "decoder_unshuffle": DecoderUnshuffleEager,
                   "masked_patch_loss": MaskedPatchLossEager, "add_layer_norm": AddLayerNormEager}


@pytest.mark.parametrize("case", [0, 1, 2, 4, 5, 6, 7, 8])
def test_eager_calls_equal_the_custom_ops_and_skip_them(device, case):
    """Eager calls enter the ops' autograd without the custom op's dispatch (host time): the same
    outputs and gradients, and no fastmae op reaches the dispatcher."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class DispatchedOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    name, args = _tiny_op_inputs(device)[case]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    results = []
    for call in (EAGER_FUNCTIONS[name].apply, getattr(torch.ops.fastmae, name)):
        with DispatchedOps() as dispatched:
            outs = call(*args)
            differentiable = [o for o in outs if o.requires_grad] if isinstance(outs, tuple) else [outs]
            grads = torch.autograd.grad(sum(o.float().sum() for o in differentiable), leaves)
        results.append((outs if isinstance(outs, tuple) else (outs,), grads, dispatched.names))
    (outs, grads, names), (op_outs, op_grads, op_names) = results
    assert all(torch.equal(a, b) for a, b in zip(outs, op_outs, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads, op_grads, strict=True))
    assert not any(n.startswith("fastmae.") for n in names) and any(n.startswith(f"fastmae.{name}") for n in op_names)


def test_torch_compile_traces_around_the_ops(device):
    """aot_eager: dynamo + AOTAutograd see the custom ops as single nodes (no C++ compiler on CPU)."""
    model = create_model("mae_vit_micro_patch4", kernels="triton", norm_pix_loss=True).to(device)
    imgs, noise = torch.randn(2, 3, 32, 32, device=device), torch.rand(2, 64, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_c, pred_c, _ = compiled(imgs, 0.75, noise, full_pred=False)
    grads_c = torch.autograd.grad(loss_c, params)
    loss, pred, _ = model(imgs, 0.75, noise, full_pred=False)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(pred_c, pred)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# The whole model: kernels="triton" against kernels="torch"
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder_mask_tokens", [False, True])
@pytest.mark.parametrize("full_pred", [True, False])
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_model_triton_equals_torch(device, norm_pix_loss, full_pred, encoder_mask_tokens):
    kwargs = dict(norm_pix_loss=norm_pix_loss, encoder_mask_tokens=encoder_mask_tokens)
    torch_model = create_model("mae_vit_micro_patch4", kernels="torch", **kwargs).to(device)
    triton_model = create_model("mae_vit_micro_patch4", kernels="triton", **kwargs).to(device)
    triton_model.load_state_dict(torch_model.state_dict())
    assert ops.resolve_kernels(triton_model.kernels, device) == "triton"
    imgs, noise = torch.randn(2, 3, 32, 32, device=device), torch.rand(2, 64, device=device)
    outputs = []
    for model in (triton_model, torch_model):
        loss, pred, mask = model(imgs, 0.9 if encoder_mask_tokens else 0.75, noise, full_pred=full_pred)
        loss.backward()
        outputs.append((loss, pred, mask, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss, pred, mask, grads), (rloss, rpred, rmask, rgrads) = outputs
    assert torch.equal(mask, rmask)
    assert pred.shape == rpred.shape == (2, 64 if full_pred else int(mask[0].sum().item()), 48)
    torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred, rpred, rtol=1e-5, atol=1e-5)
    assert grads.keys() == rgrads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], rgrads[name], rtol=1e-4, atol=1e-6, msg=name)


def _count_fused_norm_calls(monkeypatch) -> list:
    calls = []
    forward = layer_norm_kernels.add_layer_norm_forward

    def counting(*args):
        calls.append(args[1] is not None)  # True: with a branch
        return forward(*args)

    monkeypatch.setattr(layer_norm_kernels, "add_layer_norm_forward", counting)
    return calls


def _blocks_with_norm(depth: int, final_norm: bool, kernels: str, device):
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block(40, 4, kernels=kernels) for _ in range(depth)).to(device)
    norm = nn.LayerNorm(40, eps=1e-6).to(device) if final_norm else None
    with torch.no_grad():  # distinct norm parameters, so a norm taking another's weights shows
        for module in (*blocks.modules(), norm):
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.5)
                module.bias.normal_(0.0, 0.5)
    return blocks, norm


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("depth,final_norm", [(1, False), (3, False), (3, True)])
def test_fused_blocks_equal_modules(device, autocast, depth, final_norm, monkeypatch):
    """Blocks with kernels="triton" run every residual add with the LayerNorm after it (the same
    block's norm2, the next block's norm1, the final norm) as one fused op, with the outputs and
    gradients of nn.LayerNorm blocks; under autocast the norms feeding a Linear write the autocast
    dtype directly."""
    ref_blocks, ref_norm = _blocks_with_norm(depth, final_norm, "torch", device)
    fused_blocks, fused_norm = _blocks_with_norm(depth, final_norm, "triton", device)
    x = torch.randn(3, 7, 40, device=device)
    calls = _count_fused_norm_calls(monkeypatch)
    results = []
    for blocks, norm in ((fused_blocks, fused_norm), (ref_blocks, ref_norm)):
        params = [*blocks.parameters(), *(norm.parameters() if norm is not None else ())]
        xs = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = blocks[0](xs) if depth == 1 else forward_blocks(blocks, xs, norm)
        grads = torch.autograd.grad(out.float().square().sum(), [xs, *params])
        results.append((out, grads))
    # the first norm1 has no add before it; every later norm runs with the add that precedes it
    assert calls == [False] + [True] * (2 * depth - 1 + final_norm)
    (out, grads), (ref_out, ref_grads) = results
    assert out.dtype == ref_out.dtype
    rtol = 2e-2 if autocast else 1e-5  # bf16 GEMMs: the two paths' roundings differ only in order
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=rtol)
    names = ["x", *(n for n, _ in ref_blocks.named_parameters()), *(["norm.weight", "norm.bias"] if final_norm else [])]
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=rtol, atol=rtol * rg.abs().max().item(), msg=name)


def test_block_keeps_modules_under_torch_compile(device, monkeypatch):
    """Compiled, the block leaves the norms to inductor: the fused op is not in the graph."""
    block = Block(16, 2, kernels="triton").to(device)
    calls = _count_fused_norm_calls(monkeypatch)
    x = torch.randn(2, 5, 16, device=device)
    torch.testing.assert_close(torch.compile(block, backend="aot_eager")(x), block(x))
    assert calls == [False, True]  # the eager call only


def test_chain_runs_blocks_compiled_in_place(device, monkeypatch):
    """Compile scope "blocks" (Block.compile): the fused chain must call the compiled blocks, not
    go around them through the fused op."""
    blocks, norm = _blocks_with_norm(2, True, "triton", device)
    x = torch.randn(2, 5, 40, device=device)
    expected = forward_blocks(blocks, x, norm)
    calls = _count_fused_norm_calls(monkeypatch)
    for block in blocks:
        block.compile(backend="aot_eager", dynamic=False)
    torch.testing.assert_close(forward_blocks(blocks, x, norm), expected, rtol=1e-5, atol=1e-5)
    assert calls == []


def test_chain_calls_modules_that_have_hooks(device):
    """Hooks on a block, on a block's norm or on the final norm (FSDP, profilers), or global module
    hooks, must run: those modules are called, not gone around by the fused chain."""
    blocks, norm = _blocks_with_norm(2, True, "triton", device)
    x = torch.randn(2, 5, 40, device=device)
    expected = forward_blocks(blocks, x, norm)
    seen = []
    for module in (blocks[1], blocks[0].norm2, norm):
        handle = module.register_forward_hook(lambda m, args, out: seen.append(m))
        out = forward_blocks(blocks, x, norm)
        handle.remove()
        assert seen == [module]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        seen.clear()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, args: seen.append(type(m)))
    try:
        out = forward_blocks(blocks, x, norm)
    finally:
        handle.remove()
    assert seen.count(Block) == 2 and seen.count(nn.LayerNorm) == 5
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("full_pred", [True, False])
def test_model_triton_equals_torch_under_bf16_autocast(full_pred):
    """The training setting on a GPU: bf16 autocast, same roundings on both paths up to GEMM order."""
    device = torch.device("cuda")
    torch_model = create_model("mae_vit_micro_patch4", kernels="torch", norm_pix_loss=True).to(device)
    triton_model = create_model("mae_vit_micro_patch4", kernels="triton", norm_pix_loss=True).to(device)
    triton_model.load_state_dict(torch_model.state_dict())
    imgs, noise = torch.randn(8, 3, 32, 32, device=device), torch.rand(8, 64, device=device)
    outputs = []
    for model in (triton_model, torch_model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, pred, _ = model(imgs, 0.75, noise, full_pred=full_pred)
        loss.backward()
        outputs.append((loss, pred, [p.grad for p in model.parameters() if p.requires_grad]))
    (loss, pred, grads), (rloss, rpred, rgrads) = outputs
    assert loss.dtype == torch.float32 and pred.dtype == rpred.dtype
    torch.testing.assert_close(loss, rloss.float(), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(pred, rpred, rtol=5e-2, atol=5e-2)
    for g, rg in zip(grads, rgrads):
        torch.testing.assert_close(g, rg, rtol=1e-1, atol=5e-2 * rg.abs().max().item() + 1e-6)
