"""The Triton kernels against their PyTorch references (CPU: Triton interpreter; GPU: marked gpu).

Data movement (patch gather, unshuffle) must be bit-identical. Floating-point results (patch
projection, loss) are compared with a float64 reference: the kernel's error may be at most twice
PyTorch's own error at the same precision, plus a small atol.
"""

from __future__ import annotations

import functools

import pytest
import torch

import fastmae.kernels as ops
from fastmae.kernels._launch import interpreting
from fastmae.kernels.decoder_input import DecoderUnshuffle, decoder_unshuffle_reference, decoder_unshuffle_triton
from fastmae.kernels.encoder_input import (
    VisiblePatchEmbed,
    gather_patch_rows,
    visible_patch_embed_reference,
    visible_patch_embed_triton,
)
from fastmae.kernels.patch_loss import masked_patch_loss_reference, masked_patch_loss_triton
from fastmae.masking import random_masking
from fastmae.models import create_model
from fastmae.patches import patch_pixels

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


@pytest.mark.parametrize("shape", ["micro", "vith_grid", "odd"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_visible_patch_embed_matches_fp64(device, dtype, shape):
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


def test_visible_patch_embed_all_patches_and_autocast(device):
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
    masking = _masking(N, img, p, ratio, device)
    L, K = masking.ids_restore.shape[1], masking.num_visible
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
    ]


@pytest.mark.parametrize("case", range(6))
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
