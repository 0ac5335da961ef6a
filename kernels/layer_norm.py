"""Residual add + LayerNorm in one pass: the two memory-bound steps around every ViT sub-block.

Reference semantics (a pre-norm ViT block): residual = x + branch (PyTorch's type promotion, one
rounding), out = layer_norm(residual) over the last dim with weight, bias, eps; without a branch,
out = layer_norm(x). ``out_dtype`` is what the next op consumes: under autocast the next op is a
Linear that casts to the autocast dtype anyway, so the fused op writes that dtype directly (the
reference writes fp32 on CUDA autocast and a cast kernel follows).

Eager PyTorch runs the add, the norm and the cast as three kernels that read and write the
residual stream four times; the fused op reads x and the branch once and writes the residual and
the normalised output once. Backward reads the saved residual, recomputes the normalised values
from the saved mean and 1/std, adds the residual stream's incoming gradient, and writes the input
gradient once (twice when x and the branch have different dtypes, as under autocast). Weight and
bias gradients are per-program partial sums and one small torch sum (deterministic, no atomics).
Math is fp32, one rounding per stored value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.kernels._launch import (
    KERNEL_DTYPES,
    cast_rtne,
    cdiv,
    check_kernel_device,
    check_tensor,
    eager_autograd,
    first_derivative_only,
    interpreting,
    next_power_of_2,
    sm_count,
)
from fastmae.kernels.reference import add_layer_norm_reference  # noqa: F401  (the semantics; the torch path)

# One row is one tile row: wider rows would need a two-pass kernel (MAE widths are <= 1280).
MAX_WIDTH = 16384

# ---------------------------------------------------------------------------------------------
# Triton kernels. Rows are the M = prod(leading dims) tokens; a tile is BLOCK_ROWS whole rows
# (BLOCK_D >= D). A program walks tiles_per_program consecutive tiles with the weight (and bias)
# loaded once; backward sums its weight and bias gradients over them.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _row_tile(tile, tiles_per_program, cols, col_ok, M, D, BLOCK_ROWS: tl.constexpr):
    """Rows (int64) of this program's tile number ``tile``, their masks and element offsets."""
    rows = (tl.program_id(0).to(tl.int64) * tiles_per_program + tile) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < M
    return rows, row_ok, row_ok[:, None] & col_ok[None, :], rows[:, None] * D + cols[None, :]


@triton.jit
def _add_layer_norm_fwd_kernel(
    x_ptr,  # [M, D] residual stream
    branch_ptr,  # [M, D] sub-block output added to it (unused without HAS_BRANCH)
    weight_ptr,  # [D]
    bias_ptr,  # [D]
    residual_ptr,  # [M, D] x + branch in the promoted dtype (unused without HAS_BRANCH)
    out_ptr,  # [M, D] layer_norm(residual) in the requested dtype
    mean_ptr,  # [M] fp32
    rstd_ptr,  # [M] fp32: 1 / sqrt(var + eps)
    M,
    D,
    eps,
    tiles_per_program,
    HAS_BRANCH: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    for tile in range(tiles_per_program):
        rows, row_ok, ok, offsets = _row_tile(tile, tiles_per_program, cols, col_ok, M, D, BLOCK_ROWS)
        z = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        if HAS_BRANCH:
            z += tl.load(branch_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            stored = cast_rtne(z, residual_ptr.dtype.element_ty)
            tl.store(residual_ptr + offsets, stored, mask=ok)
            z = stored.to(tl.float32)  # the norm sees the rounded residual, as the reference's does
        mean = tl.sum(z, axis=1) / D
        centered = tl.where(ok, z - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        out = centered * rstd[:, None] * weight[None, :] + bias[None, :]
        tl.store(out_ptr + offsets, cast_rtne(out, out_ptr.dtype.element_ty), mask=ok)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _add_layer_norm_bwd_kernel(
    grad_out_ptr,  # [M, D] gradient of the normalised output
    grad_residual_ptr,  # [M, D] gradient of the residual output (unused without HAS_GRAD_RESIDUAL)
    z_ptr,  # [M, D] the normalised input: the residual output, or x without a branch
    weight_ptr,  # [D]
    mean_ptr,  # [M] fp32
    rstd_ptr,  # [M] fp32
    grad_in_ptr,  # [M, D] gradient of x (and of the branch when it has x's dtype)
    grad_branch_ptr,  # [M, D] gradient of the branch in its dtype (unused without STORE_GRAD_BRANCH)
    grad_weight_partial_ptr,  # [num_programs, D] fp32: this program's sum over its rows
    grad_bias_partial_ptr,  # [num_programs, D] fp32
    M,
    D,
    tiles_per_program,
    HAS_GRAD_RESIDUAL: tl.constexpr,
    STORE_GRAD_BRANCH: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    grad_weight = tl.zeros((BLOCK_D,), dtype=tl.float32)
    grad_bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for tile in range(tiles_per_program):
        rows, row_ok, ok, offsets = _row_tile(tile, tiles_per_program, cols, col_ok, M, D, BLOCK_ROWS)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        z = tl.load(z_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        z_hat = tl.where(ok, (z - mean[:, None]) * rstd[:, None], 0.0)
        g = tl.load(grad_out_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        g_hat = g * weight[None, :]
        # d/dz of (z - mean) * rstd: remove the mean of g_hat and its projection on z_hat
        c_proj = tl.sum(g_hat * z_hat, axis=1) / D
        c_mean = tl.sum(g_hat, axis=1) / D
        grad_z = (g_hat - z_hat * c_proj[:, None] - c_mean[:, None]) * rstd[:, None]
        if HAS_GRAD_RESIDUAL:
            grad_z += tl.load(grad_residual_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        tl.store(grad_in_ptr + offsets, cast_rtne(grad_z, grad_in_ptr.dtype.element_ty), mask=ok)
        if STORE_GRAD_BRANCH:
            tl.store(grad_branch_ptr + offsets, cast_rtne(grad_z, grad_branch_ptr.dtype.element_ty), mask=ok)
        grad_weight += tl.sum(g * z_hat, axis=0)
        grad_bias += tl.sum(g, axis=0)
    tl.store(grad_weight_partial_ptr + tl.program_id(0) * D + cols, grad_weight, mask=col_ok)
    tl.store(grad_bias_partial_ptr + tl.program_id(0) * D + cols, grad_bias, mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _tiles(num_rows: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps). On a GPU: one row per tile, four values per thread (one
    128-bit fp32 access). Compiled for sm_90, wider tiles cost the backward 100-230 registers per
    thread, which leaves 8-16 warps per SM to hide memory latency; these tiles need 32-49 (ViT-B/L/H
    widths and the decoder's 512). Under the interpreter (~1 ms per program instance): tiles of a
    few thousand values, small enough that tests with a few hundred rows walk several per program."""
    block_d = next_power_of_2(D)
    if interpreting():
        return min(max(1, (1 << 12) // block_d), next_power_of_2(num_rows)), block_d, 4
    return 1, block_d, min(16, max(4, block_d // 128))


def _grid(num_tiles: int, num_warps: int, device: torch.device) -> tuple[int, int]:
    """(programs, tiles per program): one wave of as many programs as an SM holds at once (64 warps
    on an H100 or A100); more would only add (programs x D) partial sums of the weight and bias
    gradients. Under the interpreter a few programs, so tests walk several tiles per program."""
    if interpreting():
        programs = min(num_tiles, 4)
    else:
        programs = min(num_tiles, sm_count(device) * max(1, 64 // num_warps))
    tiles_per_program = cdiv(num_tiles, programs)
    return cdiv(num_tiles, tiles_per_program), tiles_per_program


def _check_inputs(x, branch, weight, bias, out_dtype) -> tuple[int, int]:
    """-> (M rows, D)."""
    check_tensor("x", x)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., D] with D > 0, got shape {list(x.shape)}")
    D = x.shape[-1]
    if D > MAX_WIDTH:
        raise ValueError(f"x shape {list(x.shape)}: the fused layer norm keeps a row in one tile, D <= {MAX_WIDTH}")
    check_kernel_device(x.device)
    if branch is not None:
        check_tensor("branch", branch, tuple(x.shape), device=x.device)
    check_tensor("weight", weight, (D,), device=x.device)
    check_tensor("bias", bias, (D,), device=x.device)
    if out_dtype not in KERNEL_DTYPES:
        raise ValueError(f"out_dtype must be one of {[str(d) for d in KERNEL_DTYPES]}, got {out_dtype}")
    return x.numel() // D, D


def residual_dtype(x: torch.Tensor, branch: torch.Tensor | None) -> torch.dtype:
    return x.dtype if branch is None else torch.promote_types(x.dtype, branch.dtype)


def add_layer_norm_forward(x, branch, weight, bias, eps: float, out_dtype: torch.dtype):
    """Launch the forward kernel: -> (residual [..., D] or an empty tensor without a branch,
    out [..., D] in out_dtype, mean [M] fp32, rstd [M] fp32)."""
    M, D = _check_inputs(x, branch, weight, bias, out_dtype)
    residual = torch.empty_like(x, dtype=residual_dtype(x, branch)) if branch is not None else x.new_empty(0)
    out = torch.empty_like(x, dtype=out_dtype)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return residual, out, mean, rstd
    block_rows, block_d, num_warps = _tiles(M, D)
    programs, tiles_per_program = _grid(cdiv(M, block_rows), num_warps, x.device)
    _add_layer_norm_fwd_kernel[(programs,)](
        x, branch, weight, bias, residual, out, mean, rstd, M, D, eps, tiles_per_program,
        HAS_BRANCH=branch is not None, BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=num_warps,
    )
    return residual, out, mean, rstd


def add_layer_norm_backward(grad_out, grad_residual, z, weight, mean, rstd, x_dtype: torch.dtype,
                            branch_dtype: torch.dtype | None):
    """-> (grad_x in x_dtype, grad_branch in branch_dtype or an empty tensor when it would equal
    grad_x (same dtype) or there is no branch, [2, D] fp32 the weight and bias gradients: each is cast
    to its own parameter's dtype by the caller, which may differ)."""
    check_tensor("grad_out", grad_out, tuple(z.shape), device=z.device)
    if grad_residual is not None:
        check_tensor("grad_residual", grad_residual, tuple(z.shape), device=z.device)
    M, D = z.numel() // z.shape[-1], z.shape[-1]
    grad_x = torch.empty_like(z, dtype=x_dtype)
    store_branch = branch_dtype is not None and branch_dtype != x_dtype
    grad_branch = torch.empty_like(z, dtype=branch_dtype) if store_branch else z.new_empty(0)
    if M == 0:
        return grad_x, grad_branch, weight.new_zeros((2, D), dtype=torch.float32)
    block_rows, block_d, num_warps = _tiles(M, D)
    programs, tiles_per_program = _grid(cdiv(M, block_rows), num_warps, z.device)
    partials = torch.empty((2, programs, D), dtype=torch.float32, device=z.device)
    _add_layer_norm_bwd_kernel[(programs,)](
        grad_out, grad_residual, z, weight, mean, rstd, grad_x, grad_branch, partials[0], partials[1], M, D,
        tiles_per_program, HAS_GRAD_RESIDUAL=grad_residual is not None, STORE_GRAD_BRANCH=store_branch,
        BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=num_warps,
    )
    # one reduction for both (host time: each torch op is a few microseconds of an eager step)
    return grad_x, grad_branch, partials.sum(1)


# ---------------------------------------------------------------------------------------------
# Autograd and the torch custom ops (so torch.compile traces around the kernels)
# ---------------------------------------------------------------------------------------------


class AddLayerNorm(torch.autograd.Function):
    """Autograd of the fused add + norm; its setup_context/backward are also the custom op's.

    The op returns (residual, out, mean, rstd); mean and rstd are kept for backward, not values to
    differentiate. Without a branch the residual output is empty (the residual is x itself).
    """

    @staticmethod
    def forward(x, branch, weight, bias, eps, out_dtype):
        return add_layer_norm_forward(x, branch, weight, bias, eps, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, branch, weight, bias, eps, out_dtype = inputs
        residual, _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        if branch is None:
            ctx.mark_non_differentiable(residual)
        # an unused output's gradient arrives as None, not as a tensor of zeros to read
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x if branch is None else residual, weight, mean, rstd)
        ctx.has_branch = branch is not None
        ctx.dtypes = (x.dtype, None if branch is None else branch.dtype)
        ctx.parameter_dtypes = (weight.dtype, bias.dtype)

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_residual, grad_out, _grad_of_mean, _grad_of_rstd):
        z, weight, mean, rstd = ctx.saved_tensors
        x_dtype, branch_dtype = ctx.dtypes
        if not ctx.has_branch:
            grad_residual = None
        if grad_out is None:  # only the residual output was used: the norm adds nothing
            if grad_residual is None:
                return None, None, None, None, None, None
            grad_x = grad_residual.to(x_dtype)
            grad_branch = None if branch_dtype is None else grad_residual.to(branch_dtype)
            return grad_x, grad_branch, None, None, None, None
        backward = add_layer_norm_backward if getattr(ctx, "eager", False) else torch.ops.fastmae.add_layer_norm_backward
        grad_x, grad_branch, grad_weight_and_bias = backward(
            grad_out.contiguous(), None if grad_residual is None else grad_residual.contiguous(),
            z, weight, mean, rstd, x_dtype, branch_dtype,
        )
        grad_weight, grad_bias = (g.to(dtype) for g, dtype in zip(grad_weight_and_bias.unbind(0), ctx.parameter_dtypes))
        if branch_dtype is None:
            grad_branch = None
        elif branch_dtype == x_dtype:  # the kernel wrote one gradient for both
            grad_branch = grad_x
        return (grad_x, grad_branch, grad_weight if ctx.needs_input_grad[2] else None,
                grad_bias if ctx.needs_input_grad[3] else None, None, None)


@torch.library.custom_op("fastmae::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    x: torch.Tensor, branch: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_layer_norm_forward(x, branch, weight, bias, eps, out_dtype)


@_add_layer_norm_op.register_fake
def _(x, branch, weight, bias, eps, out_dtype):
    M = x.numel() // x.shape[-1]
    residual = x.new_empty(0) if branch is None else torch.empty_like(x, dtype=residual_dtype(x, branch))
    stats = x.new_empty(M, dtype=torch.float32)
    return residual, torch.empty_like(x, dtype=out_dtype), stats, stats.clone()


@torch.library.custom_op("fastmae::add_layer_norm_backward", mutates_args=())
def _add_layer_norm_backward_op(
    grad_out: torch.Tensor, grad_residual: torch.Tensor | None, z: torch.Tensor, weight: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, x_dtype: torch.dtype, branch_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_layer_norm_backward(grad_out, grad_residual, z, weight, mean, rstd, x_dtype, branch_dtype)


@_add_layer_norm_backward_op.register_fake
def _(grad_out, grad_residual, z, weight, mean, rstd, x_dtype, branch_dtype):
    store_branch = branch_dtype is not None and branch_dtype != x_dtype
    grad_branch = torch.empty_like(z, dtype=branch_dtype) if store_branch else z.new_empty(0)
    return torch.empty_like(z, dtype=x_dtype), grad_branch, weight.new_empty((2, weight.shape[0]), dtype=torch.float32)


torch.library.register_autograd(
    "fastmae::add_layer_norm", AddLayerNorm.backward, setup_context=AddLayerNorm.setup_context
)
AddLayerNormEager = eager_autograd(AddLayerNorm)


def add_layer_norm_triton(
    x: torch.Tensor,  # [..., D] residual stream
    branch: torch.Tensor | None,  # [..., D] sub-block output, or None: normalise x alone
    weight: torch.Tensor,  # [D]
    bias: torch.Tensor,  # [D]
    eps: float,
    out_dtype: torch.dtype | None = None,  # None: the residual's dtype
) -> tuple[torch.Tensor, torch.Tensor]:  # (residual [..., D] (x itself without a branch), out [..., D])
    """The fused add + norm (Triton); same values as ``add_layer_norm_reference``."""
    out_dtype = out_dtype or residual_dtype(x, branch)
    if torch.compiler.is_compiling():
        _check_inputs(x, branch, weight, bias, out_dtype)  # traced with fake tensors: the launcher checks nothing
        residual, out, _, _ = torch.ops.fastmae.add_layer_norm(x, branch, weight, bias, float(eps), out_dtype)
    else:
        residual, out, _, _ = AddLayerNormEager.apply(x, branch, weight, bias, float(eps), out_dtype)
    return (x if branch is None else residual), out
