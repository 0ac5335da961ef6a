"""Encoder input: patch projection of the visible patches only, + position embeddings, + cls.

Reference semantics (the MAE reference code): conv patch embedding of all L patches, + pos_embed
rows 1.., gather the kept patches, prepend cls_token + pos_embed row 0. Projecting only the K kept
patches gives the same numbers (to round-off) for a quarter of the work.

Forward:
1. the gather: the kept patches' pixels, in the conv weight's order and dtype, into the rows of a
   dense matrix A [N*(1+K), KP'] (zero rows where cls sits; KP = C*p*p padded to KP' with zero
   columns so every row starts 128-byte aligned: ViT-H's 588 values would leave rows 8-byte aligned);
2. the GEMM A @ W^T + bias in cuBLAS (torch.addmm, rounded to the weight's dtype as F.linear does),
   then an epilogue kernel that adds the gathered position row and writes cls + pos row 0 into row 0
   of each image: [N, 1+K, D]. A Triton GEMM with that epilogue fused is the other route
   (``_gemm_backend`` says why it is not the default; both are tested).
A GEMM that gathers its A operand from the images itself was tried first: the im2col addressing
held so many registers that ptxas spilled for most tile configs (and for ViT-H's 14-pixel patches,
whose rows are not 16-byte aligned, for nearly all; ``fastmae kernels compile`` shows it), while a
dense A loads in 16-byte vectors. A is kept for backward, whose weight gradient is one cuBLAS GEMM
with it (the gather is not repeated); bias and cls gradients are torch row sums (deterministic).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastmae.kernels._launch import (
    INTERPRETER,
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
    num_warps_for,
    patch_origin,
    row_blocks,
)
from fastmae.kernels.reference import visible_patch_embed_reference  # the semantics; the torch path

# The GEMM's reduction dimension KP = C*p*p is padded to a multiple of this (zero columns in A and
# W): every BLOCK_K of the configs divides it, so the GEMM loop needs no mask along K.
K_ALIGN = 64

# ---------------------------------------------------------------------------------------------
# Triton kernels. Rows are r = n * (1+K) + t: t = 0 is cls, t = 1+s is kept patch s.
# Projection order of a patch's pixels (the conv weight's): k = (c*p + i)*p + j.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _token_patch(rows, row_ok, ids_keep_ptr, s_ids, K, ALL_PATCHES: tl.constexpr):
    """Rows r of [N*(1+K), *] -> (image n, is a patch row, patch index: 0 on cls rows)."""
    n = rows // (K + 1)
    t = rows % (K + 1)
    is_patch = row_ok & (t > 0)
    if ALL_PATCHES:
        patch = tl.where(is_patch, t - 1, 0)
    else:
        patch = tl.load(ids_keep_ptr + n * s_ids + t - 1, mask=is_patch, other=0)
    return n, is_patch, patch


@triton.jit
def _patch_slab(step, s_c, s_h, s_w, PATCH: tl.constexpr, PATCH_PAD: tl.constexpr, SLAB_ROWS: tl.constexpr):
    """Slab ``step`` of a patch's pixels: SLAB_ROWS pixel rows of one channel, each padded to PATCH_PAD
    lanes, so lanes run contiguously along image rows and the loads vectorise.

    -> (pixel offsets inside the patch [SLAB], projection-order index (c*p + i)*p + j [SLAB], valid
    lanes [SLAB]) with SLAB = SLAB_ROWS * PATCH_PAD; steps 0 .. C * cdiv(PATCH, SLAB_ROWS) cover the patch.
    """
    STEPS_PER_CHANNEL: tl.constexpr = (PATCH + SLAB_ROWS - 1) // SLAB_ROWS
    lane = tl.arange(0, SLAB_ROWS * PATCH_PAD)
    c = step // STEPS_PER_CHANNEL
    i = (step % STEPS_PER_CHANNEL) * SLAB_ROWS + lane // PATCH_PAD
    j = lane % PATCH_PAD
    if PATCH == PATCH_PAD and PATCH % SLAB_ROWS == 0:  # no padding: a constant mask keeps the vectors
        ok = lane < SLAB_ROWS * PATCH_PAD
    else:
        ok = (i < PATCH) & (j < PATCH)
    return c * s_c + i * s_h + j * s_w, (c * PATCH + i) * PATCH + j, ok  # int32: within one image


@triton.jit
def _patch_rows_kernel(
    imgs_ptr,  # [N, C, H, W] strides s_n, s_c, s_h, s_w
    ids_keep_ptr,  # [N, K] int64, row stride s_ids (unused when ALL_PATCHES)
    rows_ptr,  # [N*(1+K), row_stride] written (first C*p*p columns): kept patches in projection order, zero cls rows
    num_rows,  # N * (1+K)
    K,
    row_stride,  # >= C*p*p
    grid_w,  # patches per image row
    s_ids,
    s_n,
    s_c,
    s_h,
    s_w,
    PATCH: tl.constexpr,
    PATCH_PAD: tl.constexpr,  # next power of two >= PATCH
    SLAB_ROWS: tl.constexpr,  # pixel rows per program along axis 1 (see _patch_slab)
    ALL_PATCHES: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < num_rows
    n, is_patch, patch = _token_patch(rows, row_ok, ids_keep_ptr, s_ids, K, ALL_PATCHES)
    origin = patch_origin(n, patch, grid_w, s_n, s_h, s_w, PATCH)
    pixel, k, k_ok = _patch_slab(tl.program_id(1), s_c, s_h, s_w, PATCH, PATCH_PAD, SLAB_ROWS)
    pixels = tl.load(imgs_ptr + origin[:, None] + pixel[None, :], mask=is_patch[:, None] & k_ok[None, :], other=0.0)
    tl.store(rows_ptr + rows[:, None] * row_stride + k[None, :], cast_rtne(pixels, rows_ptr.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])


# An FMA GEMM (fp32 without TF32, "ieee") holds each thread's slice of the A and B tiles in registers
# for a whole K step: thin steps keep it within 255 registers without spills on sm_80 and sm_90
# (K = 64 spilled up to 5.6 KB per thread on sm_80, ``fastmae kernels compile``). Tensor-core tiles
# step K by 64.
FMA_MAX_BLOCK_K = 32


def _gemm_configs() -> list[triton.Config]:
    if interpreting():  # one config: autotuning needs a GPU; big tiles = few interpreted programs
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1})]
    # Tiles whose fp32 accumulator takes at most 64 registers per thread (BLOCK_M * BLOCK_N <= 64 x
    # threads): the epilogue holds a position-row tile beside it, and larger accumulators made ptxas
    # spill (``fastmae kernels compile``).
    tensor_core = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                   (64, 64, 64, 4, 4), (64, 256, 64, 8, 3), (256, 64, 64, 8, 3)]
    fma = [(64, 64, 16, 4, 3), (128, 64, 16, 4, 3), (64, 128, 16, 4, 3), (128, 128, 16, 8, 3),
           (64, 64, 32, 4, 3), (128, 64, 32, 4, 3)]
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in tensor_core + fma
    ]
    assert all(K_ALIGN % c.kwargs["BLOCK_K"] == 0 for c in configs)
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps for c in configs)
    return configs


def _configs_for_dot(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The autotuner's candidates for one launch: thin-K tiles for an FMA GEMM, the others for tensor
    cores; a list without the wanted kind (the interpreter's one config, a test's) is kept whole."""
    fma = {**named_args, **kwargs}["DOT_PRECISION"] == "ieee"
    return [c for c in configs if (c.kwargs["BLOCK_K"] <= FMA_MAX_BLOCK_K) == fma] or configs


@triton.autotune(configs=_gemm_configs(), key=["D", "KP", "ALL_PATCHES", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": _configs_for_dot})
@triton.jit
def _visible_patch_embed_fwd_kernel(
    rows_ptr,  # [N*(1+K), KP] the gathered patches (_patch_rows_kernel), weight's dtype, zero padding columns
    ids_keep_ptr,  # [N, K] int64 kept patches, row stride s_ids (unused when ALL_PATCHES)
    weight_ptr,  # [D, KP] the conv weight [D, C, p, p] flattened, zero padding columns
    bias_ptr,  # [D] weight's dtype
    pos_ptr,  # [1+L, D] position embeddings, row 0 for cls
    cls_ptr,  # [D]
    out_ptr,  # [N*(1+K), D]
    num_rows,  # N * (1+K)
    K,
    D,
    KP,  # C*p*p padded to a multiple of K_ALIGN (so of BLOCK_K)
    s_ids,
    ALL_PATCHES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped tile order: GROUP_M row tiles share their A rows in L2 across the column tiles
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(num_rows, BLOCK_M)
    tiles_n = tl.cdiv(D, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
    pid_n = (pid % (GROUP_M * tiles_n)) // group_m

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    k = tl.arange(0, BLOCK_K)
    a_ptrs = rows_ptr + rows[:, None] * KP + k[None, :]
    b_ptrs = weight_ptr + cols[None, :].to(tl.int64) * KP + k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, KP, BLOCK_K):  # no mask along K: KP is a multiple of BLOCK_K, padding is zero
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        if INTERPRETER:  # the interpreter's tl.dot is wrong on bf16/fp16 operands
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    # round to the weight's dtype like F.linear's output, then add pos in fp32 (one rounding on store)
    proj = cast_rtne(acc + bias[None, :], weight_ptr.dtype.element_ty).to(tl.float32)
    _store_tokens(proj, rows, row_ok, cols, col_ok, ids_keep_ptr, pos_ptr, cls_ptr, out_ptr, K, D, s_ids, ALL_PATCHES)


@triton.jit
def _store_tokens(proj, rows, row_ok, cols, col_ok, ids_keep_ptr, pos_ptr, cls_ptr, out_ptr, K, D, s_ids,
                  ALL_PATCHES: tl.constexpr):
    """The embedding's epilogue for a tile of output rows: the projection (fp32 values of the weight's
    dtype) on patch rows, cls on cls rows, plus the position row, one rounding on store."""
    n, is_patch, patch = _token_patch(rows, row_ok, ids_keep_ptr, s_ids, K, ALL_PATCHES)
    cls = tl.load(cls_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    pos_row = tl.where(is_patch, patch + 1, 0)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    pos = tl.load(pos_ptr + pos_row[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    out = tl.where(is_patch[:, None], proj, cls[None, :]) + pos
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], cast_rtne(out, out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _position_epilogue_kernel(
    proj_ptr,  # [N*(1+K), D] the projection with its bias, weight's dtype (cuBLAS); cls rows unused
    ids_keep_ptr,  # [N, K] int64 kept patches, row stride s_ids (unused when ALL_PATCHES)
    pos_ptr,  # [1+L, D] position embeddings, row 0 for cls
    cls_ptr,  # [D]
    out_ptr,  # [N*(1+K), D]
    num_rows,  # N * (1+K)
    K,
    D,
    s_ids,
    ALL_PATCHES: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < num_rows
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    proj = tl.load(proj_ptr + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                   other=0.0).to(tl.float32)
    _store_tokens(proj, rows, row_ok, cols, col_ok, ids_keep_ptr, pos_ptr, cls_ptr, out_ptr, K, D, s_ids, ALL_PATCHES)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _check_inputs(imgs, ids_keep, weight, bias, pos_embed, cls_token, patch_size) -> tuple[int, int, int]:
    """-> (N, K, D)."""
    check_tensor("weight", weight, (None, None, patch_size, patch_size))
    D, C = weight.shape[:2]
    L, _ = check_patch_grid(imgs, patch_size, in_chans=C)
    check_kernel_device(imgs.device)
    N = imgs.shape[0]
    check_tensor("weight", weight, device=imgs.device)
    check_tensor("bias", bias, (D,), dtypes=(weight.dtype,), device=imgs.device)
    check_tensor("pos_embed", pos_embed, (1, L + 1, D), device=imgs.device)
    check_tensor("cls_token", cls_token, (1, 1, D), device=imgs.device)
    if ids_keep is None:
        return N, L, D
    check_patch_ids("ids_keep", ids_keep, N, L, imgs.device)
    return N, ids_keep.shape[1], D


def _output_dtype(weight: torch.Tensor, pos_embed: torch.Tensor, cls_token: torch.Tensor) -> torch.dtype:
    """The reference's type promotion: F.linear in the weight's dtype, + pos, cat with cls + pos."""
    return torch.promote_types(torch.promote_types(weight.dtype, pos_embed.dtype), cls_token.dtype)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow torch's own TF32 setting, so "triton" and "torch" round alike; bf16/fp16 ignore it."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _padded_width(patch_values: int) -> int:
    return cdiv(patch_values, K_ALIGN) * K_ALIGN


def gather_patch_rows(imgs, ids_keep, patch_size: int, dtype: torch.dtype, row_stride: int) -> torch.Tensor:
    """Launch the gather: -> [N*(1+K), row_stride] in ``dtype``: kept patches in projection order in the
    first C*p*p columns, zeros in the others and in the cls rows."""
    L, grid_w = check_patch_grid(imgs, patch_size)
    check_kernel_device(imgs.device)
    N, C = imgs.shape[:2]
    if ids_keep is not None:
        check_patch_ids("ids_keep", ids_keep, N, L, imgs.device)
    K = L if ids_keep is None else ids_keep.shape[1]
    KP = C * patch_size * patch_size
    num_rows = N * (K + 1)
    rows = torch.empty((num_rows, row_stride), dtype=dtype, device=imgs.device)
    if row_stride > KP:
        rows[:, KP:].zero_()
    patch_pad = next_power_of_2(patch_size)
    slab_rows = min(patch_pad, max(1, 256 // patch_pad))  # slabs of ~256 pixels
    block_rows, slab = row_blocks(slab_rows * patch_pad)
    steps = C * cdiv(patch_size, slab_rows)
    _patch_rows_kernel[(cdiv(num_rows, block_rows), steps)](
        imgs, ids_keep, rows, num_rows, K, row_stride, grid_w, 0 if ids_keep is None else ids_keep.stride(0),
        *imgs.stride(),
        PATCH=patch_size, PATCH_PAD=patch_pad, SLAB_ROWS=slab_rows, ALL_PATCHES=ids_keep is None,
        BLOCK_ROWS=block_rows, num_warps=num_warps_for(block_rows * slab),
    )
    return rows


GEMM_ROUTES = ("cublas", "triton")
_chosen_gemm_route: contextvars.ContextVar[str | None] = contextvars.ContextVar("encoder_input_gemm", default=None)


@contextlib.contextmanager
def gemm_route(route: str):
    """Within the block, project the gathered patches with ``route`` (one of ``GEMM_ROUTES``) instead
    of the default: ``fastmae kernels compile`` compiles both routes' kernels."""
    if route not in GEMM_ROUTES:
        raise ValueError(f"unknown GEMM route {route!r}; choose from {GEMM_ROUTES}")
    token = _chosen_gemm_route.set(route)
    try:
        yield
    finally:
        _chosen_gemm_route.reset(token)


def _gemm_backend(num_rows: int, D: int, KP: int) -> str:
    """Which GEMM projects the gathered patches: "triton" (the epilogue fused into it) or "cublas"
    (torch.addmm, then ``_position_epilogue_kernel``: one more pass over the output, cuBLAS's GEMM).

    cuBLAS, at every shape: on the H100 (2026-11-25, benchmarks/results/kernel_shapes_h100-80gb-hbm3_20261125.json,
    fwd+bwd, p10) it took 0.207 ms against the Triton route's 0.235 at ViT-B's shapes, 0.240 against 0.281
    at ViT-L's, 0.424 against 0.464 at ViT-H's. The shape is passed for a rule by shape, should a GPU show
    one; ``benchmarks/kernel_shapes_gpu.py`` times both routes at each model's shapes."""
    return _chosen_gemm_route.get() or "cublas"


def visible_patch_embed_forward(imgs, ids_keep, weight, bias, pos_embed, cls_token, patch_size: int):
    """Launch the gather and the GEMM: -> (out [N, 1+K, D], the gathered patches A [N*(1+K), KP'])."""
    N, K, D = _check_inputs(imgs, ids_keep, weight, bias, pos_embed, cls_token, patch_size)
    KP = weight[0].numel()
    KP_pad = _padded_width(KP)
    rows = gather_patch_rows(imgs, ids_keep, patch_size, weight.dtype, KP_pad)
    weight_rows = F.pad(weight.reshape(D, KP), (0, KP_pad - KP)) if KP_pad > KP else weight.reshape(D, KP)
    out = torch.empty((N, K + 1, D), dtype=_output_dtype(weight, pos_embed, cls_token), device=imgs.device)
    num_rows = N * (K + 1)
    s_ids = 0 if ids_keep is None else ids_keep.stride(0)
    if _gemm_backend(num_rows, D, KP_pad) == "cublas":
        proj = torch.addmm(bias, rows, weight_rows.t())  # F.linear's rounding: bias in the fp32 accumulator
        block_rows, block_d = row_blocks(min(D, 1024))
        _position_epilogue_kernel[(cdiv(num_rows, block_rows), cdiv(D, block_d))](
            proj, ids_keep, pos_embed, cls_token, out, num_rows, K, D, s_ids,
            ALL_PATCHES=ids_keep is None, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
            num_warps=num_warps_for(block_rows * block_d),
        )
        return out, rows

    def grid(meta):
        return (cdiv(num_rows, meta["BLOCK_M"]) * cdiv(D, meta["BLOCK_N"]),)

    _visible_patch_embed_fwd_kernel[grid](
        rows, ids_keep, weight_rows, bias, pos_embed, cls_token, out, num_rows, K, D, KP_pad, s_ids,
        ALL_PATCHES=ids_keep is None, DOT_PRECISION=_dot_precision(weight.dtype),
    )
    return out, rows


# ---------------------------------------------------------------------------------------------
# Autograd and the torch custom ops (so torch.compile traces around the kernels)
# ---------------------------------------------------------------------------------------------


class VisiblePatchEmbed(torch.autograd.Function):
    """Autograd of the fused patch embedding; its setup_context/backward are also the custom op's.

    The op returns (out, the gathered patches); the second output is kept for the weight gradient,
    not a value to differentiate. Gradients for weight, bias and cls_token come from the kernels'
    outputs. imgs and pos_embed need none in MAE (pixels, frozen sin-cos table); if asked for, they
    come from differentiating the reference.
    """

    @staticmethod
    def forward(imgs, ids_keep, weight, bias, pos_embed, cls_token, patch_size):
        return visible_patch_embed_forward(imgs, ids_keep, weight, bias, pos_embed, cls_token, patch_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        imgs, ids_keep, weight, bias, pos_embed, cls_token, patch_size = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(imgs, ids_keep, weight, bias, pos_embed, cls_token, output[1])
        ctx.patch_size = patch_size

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_out, _grad_of_rows):
        imgs, ids_keep, weight, bias, pos_embed, cls_token, rows = ctx.saved_tensors
        N, T, D = grad_out.shape
        grad_rows = grad_out.reshape(N * T, D).to(weight.dtype)  # F.linear's backward runs in its dtype
        grad_weight = grad_bias = grad_cls = grad_imgs = grad_pos = None
        if ctx.needs_input_grad[2]:
            patches = rows[:, : weight[0].numel()]  # cls rows are zero: they add nothing
            grad_weight = (grad_rows.t() @ patches).view_as(weight)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_rows.view(N, T, D)[:, 1:].sum((0, 1)).to(bias.dtype)
        if ctx.needs_input_grad[5]:
            grad_cls = grad_out[:, 0].sum(0).view(1, 1, D).to(cls_token.dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[4]:
            with torch.enable_grad():
                imgs_, pos_ = imgs.detach().requires_grad_(), pos_embed.detach().requires_grad_()
                out = visible_patch_embed_reference(imgs_, ids_keep, weight.detach(), bias.detach(), pos_,
                                                    cls_token.detach(), ctx.patch_size)
                grad_imgs, grad_pos = torch.autograd.grad(out, (imgs_, pos_), grad_out.to(out.dtype))
        return (grad_imgs if ctx.needs_input_grad[0] else None), None, grad_weight, grad_bias, \
            (grad_pos if ctx.needs_input_grad[4] else None), grad_cls, None


@torch.library.custom_op("fastmae::visible_patch_embed", mutates_args=())
def _visible_patch_embed_op(
    imgs: torch.Tensor, ids_keep: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
    pos_embed: torch.Tensor, cls_token: torch.Tensor, patch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return visible_patch_embed_forward(imgs, ids_keep, weight, bias, pos_embed, cls_token, patch_size)


@_visible_patch_embed_op.register_fake
def _(imgs, ids_keep, weight, bias, pos_embed, cls_token, patch_size):
    K = pos_embed.shape[1] - 1 if ids_keep is None else ids_keep.shape[1]
    N, D = imgs.shape[0], weight.shape[0]
    out = imgs.new_empty((N, K + 1, D), dtype=_output_dtype(weight, pos_embed, cls_token))
    return out, imgs.new_empty((N * (K + 1), _padded_width(weight[0].numel())), dtype=weight.dtype)


torch.library.register_autograd(
    "fastmae::visible_patch_embed", VisiblePatchEmbed.backward, setup_context=VisiblePatchEmbed.setup_context
)
VisiblePatchEmbedEager = eager_autograd(VisiblePatchEmbed)


def visible_patch_embed_triton(
    imgs: torch.Tensor,  # [N, C, H, W]
    ids_keep: torch.Tensor | None,  # [N, K] int64, or None for all L patches
    weight: torch.Tensor,  # [D, C, p, p]
    bias: torch.Tensor,  # [D]
    pos_embed: torch.Tensor,  # [1, 1+L, D]
    cls_token: torch.Tensor,  # [1, 1, D]
    patch_size: int,
) -> torch.Tensor:  # [N, 1+K, D]
    """The fused patch embedding (Triton); same values as ``visible_patch_embed_reference``.

    Under autocast the projection runs in the autocast dtype, as F.linear would: the weight and bias
    are cast here (differentiably; they are small), the images by the gather kernel as it copies them.
    """
    if torch.is_autocast_enabled(imgs.device.type):
        dtype = torch.get_autocast_dtype(imgs.device.type)
        weight, bias = weight.to(dtype), bias.to(dtype)
    if torch.compiler.is_compiling():
        _check_inputs(imgs, ids_keep, weight, bias, pos_embed, cls_token, patch_size)  # traced with fake tensors
        out, _ = torch.ops.fastmae.visible_patch_embed(imgs, ids_keep, weight, bias, pos_embed, cls_token, patch_size)
        return out
    out, _ = VisiblePatchEmbedEager.apply(imgs, ids_keep, weight, bias, pos_embed, cls_token, patch_size)
    return out
