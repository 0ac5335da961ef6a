"""MAE loss: per-patch MSE against the (optionally normalised) pixels, averaged over removed patches.

Reference semantics (the MAE reference code): target = patchify(imgs); with norm_pix_loss each
patch is normalised by its own mean and UNBIASED variance, (t - mean) / sqrt(var + 1e-6); the loss
is the per-patch mean of squared errors, averaged with the mask as weights.

The fused op cuts each patch's target straight out of the images (no target tensor in memory),
normalises it in registers, and in the same pass writes the direction of d(loss)/d(pred),
(pred - target) w in pred's dtype; backward scales it by 2 / (P sum(w)) times the incoming gradient,
in fp32 with one rounding, as autograd of the reference does. (Storing the scaled gradient instead
would put it below fp16's normal range at training sizes, about 7e-8 for ViT-B at batch 256, before
the GradScaler's factor arrives.) Per-program partial sums of err * w and one small torch sum give
the loss without atomics (deterministic). Math is fp32; the loss is an fp32 scalar.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.kernels._launch import (
    RowTiles,
    cast_rtne,
    cdiv,
    check_kernel_device,
    check_patch_grid,
    check_patch_ids,
    check_tensor,
    eager_autograd,
    first_derivative_only,
    interpreting,
    next_power_of_2,
    one_tile_per_program,
    patch_origin,
)
from fastmae.kernels.reference import NORM_PIX_EPS, masked_patch_loss_reference  # the semantics; the torch path

# ---------------------------------------------------------------------------------------------
# Triton kernel. Rows are the N * M predicted patches; a program handles ROW_TILES tiles of
# BLOCK_ROWS patches, each patch's P = p*p*C values in one BLOCK_P-wide row.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _masked_patch_loss_kernel(
    pred_ptr,  # [N, M, P] predicted pixels in target order (i*p + j)*C + c
    imgs_ptr,  # [N, C, H, W] strides s_n, s_c, s_h, s_w
    patch_ids_ptr,  # [N, M] int64 patch of each prediction row, row stride s_ids (unused when ALL_PATCHES)
    weight_ptr,  # [N, M] fp32 per-patch weight, the mask (unused when not WEIGHTED)
    grad_dir_ptr,  # [N, M, P] (pred - target) * weight, pred's dtype (unused when not COMPUTE_GRAD)
    partial_ptr,  # [num_programs] fp32: this program's sum of err * weight
    num_rows,  # N * M
    M,
    grid_w,  # patches per image row
    s_ids,
    s_n,
    s_c,
    s_h,
    s_w,
    PATCH: tl.constexpr,
    C: tl.constexpr,
    NORM_PIX: tl.constexpr,
    EPS: tl.constexpr,
    ALL_PATCHES: tl.constexpr,
    WEIGHTED: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ROW_TILES: tl.constexpr,
):
    # P = p*p*C as a constexpr: ViT-H's 588 then proves 4-element alignment of pred's rows and of the
    # mask, so pred and its gradient move in 8-byte vectors rather than one bf16 at a time
    P: tl.constexpr = PATCH * PATCH * C
    k = tl.arange(0, BLOCK_P)
    k_ok = k < P
    # target order k = (i*p + j)*C + c -> pixel (c, i, j) of the patch
    c = k % C
    j = (k // C) % PATCH
    i = k // (C * PATCH)
    pixel = c * s_c + i * s_h + j * s_w  # inside one image: int32 (the launcher checks C*H*W < 2**31)
    loss_sum = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    first_row = tl.program_id(0).to(tl.int64) * (BLOCK_ROWS * ROW_TILES)
    for tile in tl.static_range(ROW_TILES):
        rows = first_row + tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < num_rows
        n = rows // M
        if ALL_PATCHES:
            patch = rows % M
        else:
            patch = tl.load(patch_ids_ptr + n * s_ids + rows % M, mask=row_ok, other=0)
        origin = patch_origin(n, patch, grid_w, s_n, s_h, s_w, PATCH)
        ok = row_ok[:, None] & k_ok[None, :]
        target = tl.load(imgs_ptr + origin[:, None] + pixel[None, :], mask=ok, other=0.0).to(tl.float32)
        if NORM_PIX:
            mean = tl.sum(target, axis=1) / P
            centred = tl.where(ok, target - mean[:, None], 0.0)
            var = tl.sum(centred * centred, axis=1) / (P - 1)  # unbiased, as torch.var
            target = tl.div_rn(centred, tl.sqrt_rn(var + EPS)[:, None])
        pred = tl.load(pred_ptr + rows[:, None] * P + k[None, :], mask=ok, other=0.0).to(tl.float32)
        diff = tl.where(ok, pred - target, 0.0)
        err = tl.sum(diff * diff, axis=1) / P
        if WEIGHTED:
            w = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
        else:
            w = tl.where(row_ok, 1.0, 0.0)
        loss_sum += err * w
        if COMPUTE_GRAD:
            tl.store(grad_dir_ptr + rows[:, None] * P + k[None, :],
                     cast_rtne(diff * w[:, None], grad_dir_ptr.dtype.element_ty), mask=ok)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(loss_sum, axis=0))


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def _check_inputs(pred, imgs, patch_size, patch_ids, weight) -> tuple[int, int, int, int]:
    """-> (N, M, L, grid width)."""
    L, grid_w = check_patch_grid(imgs, patch_size)
    check_kernel_device(imgs.device)
    N, C = imgs.shape[:2]
    P = patch_size * patch_size * C
    check_tensor("pred", pred, (N, None, P), device=imgs.device)
    M = pred.shape[1]
    if patch_ids is None:
        if M != L:
            raise ValueError(f"pred shape {list(pred.shape)}: without patch_ids it must hold all L = {L} patches")
    else:
        check_patch_ids("patch_ids", patch_ids, N, L, imgs.device)
        if patch_ids.shape[1] != M:
            raise ValueError(f"patch_ids shape {list(patch_ids.shape)} does not match pred shape {list(pred.shape)}")
    if weight is not None:
        check_tensor("weight", weight, (N, M), dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64),
                     device=imgs.device, contiguous=False)
    return N, M, L, grid_w


def _launch_shape(num_rows: int, block_p: int) -> RowTiles:
    if interpreting():  # few programs: each costs ~1 ms there
        return RowTiles(max(1, min(next_power_of_2(num_rows), (1 << 15) // block_p)), 1, 4)
    # fwd + bwd, batch 256, bf16: 0.246 ms at ViT-B/L, against 0.325 ms for 8 tiles of 8 warps
    return one_tile_per_program(block_p)


def masked_patch_loss_forward(pred, imgs, patch_size: int, norm_pix_loss: bool, patch_ids, weight, compute_grad: bool):
    """Launch the kernel: -> (loss fp32 scalar, (pred - target) * weight [N, M, P] or an empty tensor,
    grad_scale fp32 scalar), d(loss)/d(pred) being grad_scale times the second."""
    N, M, L, grid_w = _check_inputs(pred, imgs, patch_size, patch_ids, weight)
    C = imgs.shape[1]
    P = pred.shape[2]
    num_rows = N * M
    block_p = next_power_of_2(P)
    shape = _launch_shape(num_rows, block_p)
    programs = cdiv(num_rows, shape.block_rows * shape.row_tiles)
    if weight is not None:
        weight = weight.to(torch.float32).contiguous()
    grad_dir = torch.empty_like(pred) if compute_grad else pred.new_empty(0)
    partial = torch.empty(programs, dtype=torch.float32, device=pred.device)
    _masked_patch_loss_kernel[(programs,)](
        pred, imgs, patch_ids, weight, grad_dir, partial,
        num_rows, M, grid_w, 0 if patch_ids is None else patch_ids.stride(0), *imgs.stride(),
        PATCH=patch_size, C=C, NORM_PIX=norm_pix_loss, EPS=NORM_PIX_EPS,
        ALL_PATCHES=patch_ids is None, WEIGHTED=weight is not None, COMPUTE_GRAD=compute_grad,
        BLOCK_ROWS=shape.block_rows, BLOCK_P=block_p, ROW_TILES=shape.row_tiles, num_warps=shape.num_warps,
    )
    # made on the device (fill, not a host-to-device copy, which would synchronise) and never read back
    total_weight = weight.sum() if weight is not None else torch.full((), float(num_rows), device=pred.device)
    return partial.sum() / total_weight, grad_dir, 2.0 / (P * total_weight)


# ---------------------------------------------------------------------------------------------
# Autograd and the torch custom op (so torch.compile traces around the kernel)
# ---------------------------------------------------------------------------------------------


class MaskedPatchLoss(torch.autograd.Function):
    """Autograd of the loss; its setup_context/backward are also the custom op's autograd.

    The op returns (loss, gradient direction, gradient scale); the last two are saved for backward,
    not values to differentiate. Gradients for imgs and weight (never needed in MAE training) come
    from differentiating the reference.
    """

    @staticmethod
    def forward(pred, imgs, patch_size, norm_pix_loss, patch_ids, weight, compute_grad):
        return masked_patch_loss_forward(pred, imgs, patch_size, norm_pix_loss, patch_ids, weight, compute_grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pred, imgs, patch_size, norm_pix_loss, patch_ids, weight, compute_grad = inputs
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(output[1], output[2], pred, imgs, patch_ids, weight)
        ctx.patch_size, ctx.norm_pix_loss, ctx.compute_grad = patch_size, norm_pix_loss, compute_grad

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_loss, _grad_of_grad_dir, _grad_of_grad_scale):
        grad_dir, grad_scale, pred, imgs, patch_ids, weight = ctx.saved_tensors
        grad_pred = grad_imgs = grad_weight = None
        if ctx.needs_input_grad[0]:
            if not ctx.compute_grad:
                raise RuntimeError("masked_patch_loss was called with compute_grad=False but pred needs a gradient")
            # a 0-dim fp32 factor: computed in fp32, rounded once to pred's dtype
            grad_pred = grad_dir * (grad_loss * grad_scale)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[5]:
            with torch.enable_grad():
                imgs_ = imgs.detach().requires_grad_()
                weight_ = None if weight is None else weight.detach().requires_grad_()
                loss = masked_patch_loss_reference(pred.detach(), imgs_, ctx.patch_size, ctx.norm_pix_loss,
                                                   patch_ids, weight_)
                wrt = [imgs_] + ([weight_] if weight_ is not None else [])
                grads = torch.autograd.grad(loss, wrt, grad_loss.to(loss.dtype))
            grad_imgs = grads[0] if ctx.needs_input_grad[1] else None
            grad_weight = grads[1] if ctx.needs_input_grad[5] else None
        return grad_pred, grad_imgs, None, None, None, grad_weight, None


@torch.library.custom_op("fastmae::masked_patch_loss", mutates_args=())
def _masked_patch_loss_op(
    pred: torch.Tensor, imgs: torch.Tensor, patch_size: int, norm_pix_loss: bool,
    patch_ids: torch.Tensor | None, weight: torch.Tensor | None, compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return masked_patch_loss_forward(pred, imgs, patch_size, norm_pix_loss, patch_ids, weight, compute_grad)


@_masked_patch_loss_op.register_fake
def _(pred, imgs, patch_size, norm_pix_loss, patch_ids, weight, compute_grad):
    grad_dir = torch.empty_like(pred) if compute_grad else pred.new_empty(0)
    scalar = pred.new_empty((), dtype=torch.float32)
    return scalar, grad_dir, scalar.clone()


torch.library.register_autograd(
    "fastmae::masked_patch_loss", MaskedPatchLoss.backward, setup_context=MaskedPatchLoss.setup_context
)
MaskedPatchLossEager = eager_autograd(MaskedPatchLoss)


def masked_patch_loss_triton(
    pred: torch.Tensor,  # [N, M, p*p*C]
    imgs: torch.Tensor,  # [N, C, H, W]
    patch_size: int,
    norm_pix_loss: bool,
    patch_ids: torch.Tensor | None = None,  # [N, M] int64, or None: M == L in patch order
    weight: torch.Tensor | None = None,  # [N, M], or None: every patch weighs 1
) -> torch.Tensor:  # fp32 scalar
    """The fused loss (Triton); same value as ``masked_patch_loss_reference`` (fp32)."""
    compute_grad = pred.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling():
        _check_inputs(pred, imgs, patch_size, patch_ids, weight)  # traced with fake tensors: the launcher checks nothing
        loss, _, _ = torch.ops.fastmae.masked_patch_loss(
            pred, imgs, patch_size, bool(norm_pix_loss), patch_ids, weight, compute_grad
        )
        return loss
    loss, _, _ = MaskedPatchLossEager.apply(pred, imgs, patch_size, bool(norm_pix_loss), patch_ids, weight, compute_grad)
    return loss
