"""Decoder input: visible tokens back in their places, mask tokens elsewhere, + position embeddings.

Reference semantics (the MAE reference code): concatenate the visible tokens (without cls) with
L - K mask tokens, gather with ids_restore to put every token back in the original patch order,
put cls first again and add decoder_pos_embed.

The fused op reads each visible token once and writes each output token once: output row 1+l
takes visible token ids_restore[l] when that is < K, the mask token otherwise, plus pos row 1+l.
The output dtype is the reference's type promotion of (x, mask_token, pos_embed), and the values
are bit-identical to it (one fp32 add, one rounding). Backward scatters each output gradient row
back to its visible token (a permutation: no atomics) and reduces the mask-token gradient through
per-program partial sums and one small torch sum (deterministic).
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
    check_permutations,
    check_tensor,
    eager_autograd,
    first_derivative_only,
    interpreting,
    next_power_of_2,
    num_warps_for,
    one_tile_per_program,
    row_blocks,
)
from fastmae.kernels.reference import decoder_unshuffle_reference  # noqa: F401  (the semantics; the torch path)

# ---------------------------------------------------------------------------------------------
# Triton kernels. Rows are the N * (1+L) output tokens; a program handles ROW_TILES tiles of
# BLOCK_ROWS rows times one BLOCK_D slice of the channels.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _source_token(rows, row_ok, ids_restore_ptr, L, K):
    """For output rows (n, t): the image n, the token t, and the row of x it copies (or > K: mask)."""
    n = rows // (L + 1)
    t = rows % (L + 1)
    is_patch = t > 0
    slot = tl.load(ids_restore_ptr + n * L + t - 1, mask=row_ok & is_patch, other=0)
    src = tl.where(is_patch, slot + 1, 0)  # row of x: cls -> 0, visible slot s -> 1+s
    return n, t, src


@triton.jit
def _decoder_unshuffle_fwd_kernel(
    x_ptr,  # [N, 1+K, D] decoder-embedded tokens, cls first, visible tokens in shuffled order
    mask_token_ptr,  # [D]
    ids_restore_ptr,  # [N, L] int64: slot of patch l in the shuffled order
    pos_ptr,  # [1+L, D] decoder position embeddings
    out_ptr,  # [N, 1+L, D]
    num_rows,  # N * (1+L)
    L,
    K,
    D,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROW_TILES: tl.constexpr,
):
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask_token = tl.load(mask_token_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    first_row = tl.program_id(0).to(tl.int64) * (BLOCK_ROWS * ROW_TILES)
    for tile in tl.static_range(ROW_TILES):
        rows = first_row + tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < num_rows
        n, t, src = _source_token(rows, row_ok, ids_restore_ptr, L, K)
        from_x = row_ok & (src <= K)
        tile_ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + (n * (K + 1) + src)[:, None] * D + cols[None, :],
                    mask=from_x[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        token = tl.where(from_x[:, None], x, mask_token[None, :])
        pos = tl.load(pos_ptr + t[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        out = token + pos
        tl.store(out_ptr + rows[:, None] * D + cols[None, :], cast_rtne(out, out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _decoder_unshuffle_bwd_kernel(
    grad_out_ptr,  # [N, 1+L, D]
    ids_restore_ptr,  # [N, L] int64
    grad_x_ptr,  # [N, 1+K, D] written: every row is the gradient of exactly one output row
    mask_partial_ptr,  # [num_programs_0, D] fp32: this program's sum over its mask-token rows
    num_rows,  # N * (1+L)
    L,
    K,
    D,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROW_TILES: tl.constexpr,
):
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first_row = tl.program_id(0).to(tl.int64) * (BLOCK_ROWS * ROW_TILES)
    for tile in tl.static_range(ROW_TILES):
        rows = first_row + tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < num_rows
        n, t, src = _source_token(rows, row_ok, ids_restore_ptr, L, K)
        from_x = row_ok & (src <= K)
        g = tl.load(grad_out_ptr + rows[:, None] * D + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        tl.store(grad_x_ptr + (n * (K + 1) + src)[:, None] * D + cols[None, :],
                 cast_rtne(g, grad_x_ptr.dtype.element_ty), mask=from_x[:, None] & col_ok[None, :])
        is_mask = row_ok & (src > K)
        mask_sum += tl.sum(tl.where(is_mask[:, None], g.to(tl.float32), 0.0), axis=0)
    tl.store(mask_partial_ptr + tl.program_id(0) * D + cols, mask_sum, mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _launch_shape(num_rows: int, block_d: int) -> RowTiles:
    if interpreting():  # few programs: each costs ~1 ms there
        block_rows, _ = row_blocks(block_d)
        return RowTiles(block_rows, 1 if block_rows >= num_rows else 8, num_warps_for(block_rows * block_d))
    # fwd + bwd, batch 256, bf16: 0.118 ms at ViT-B/L's decoder, against 0.219 ms for 8 tiles of 8 warps
    return one_tile_per_program(block_d)


def _grid_shape(num_rows: int, D: int) -> tuple[RowTiles, int, int]:
    """(the row tiling, BLOCK_D, row programs)."""
    block_d = next_power_of_2(min(D, 1024))
    shape = _launch_shape(num_rows, block_d)
    return shape, block_d, cdiv(num_rows, shape.block_rows * shape.row_tiles)


def _check_inputs(x, mask_token, ids_restore, pos_embed) -> tuple[int, int, int, int]:
    check_tensor("x", x, (None, None, None))
    N, T, D = x.shape
    check_kernel_device(x.device)
    check_tensor("ids_restore", ids_restore, (N, None), dtypes=(torch.int64,), device=x.device)
    L = ids_restore.shape[1]
    if not 1 <= T <= L + 1:
        raise ValueError(
            f"x shape {list(x.shape)}: expected [N, 1+K, D] with 0 <= K <= L = {L} "
            f"(ids_restore {list(ids_restore.shape)})"
        )
    check_tensor("mask_token", mask_token, (1, 1, D), device=x.device)
    check_tensor("pos_embed", pos_embed, (1, L + 1, D), device=x.device)
    # the backward adds each output row's gradient into one slot: a repeated or missing slot gets a wrong one
    check_permutations("ids_restore", ids_restore)
    return N, T - 1, L, D


def decoder_unshuffle_forward(x, mask_token, ids_restore, pos_embed) -> torch.Tensor:
    """Launch the forward kernel: -> [N, 1+L, D] in promote_types(x, mask_token, pos_embed)."""
    N, K, L, D = _check_inputs(x, mask_token, ids_restore, pos_embed)
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)
    out = torch.empty((N, L + 1, D), dtype=out_dtype, device=x.device)
    num_rows = N * (L + 1)
    shape, block_d, row_programs = _grid_shape(num_rows, D)
    _decoder_unshuffle_fwd_kernel[(row_programs, cdiv(D, block_d))](
        x, mask_token, ids_restore, pos_embed, out, num_rows, L, K, D,
        BLOCK_ROWS=shape.block_rows, BLOCK_D=block_d, ROW_TILES=shape.row_tiles, num_warps=shape.num_warps,
    )
    return out


def decoder_unshuffle_backward(
    grad_out, ids_restore, num_visible: int, x_dtype: torch.dtype, mask_token_dtype: torch.dtype
):
    """grad_out [N, 1+L, D] -> (grad_x [N, 1+K, D] in x_dtype, grad_mask_token [1, 1, D])."""
    check_tensor("grad_out", grad_out, (None, None, None))
    N, T, D = grad_out.shape
    check_tensor("ids_restore", ids_restore, (N, T - 1), dtypes=(torch.int64,), device=grad_out.device)
    L, K = T - 1, num_visible
    num_rows = N * (L + 1)
    shape, block_d, row_programs = _grid_shape(num_rows, D)
    grad_x = torch.empty((N, K + 1, D), dtype=x_dtype, device=grad_out.device)
    mask_partial = torch.empty((row_programs, D), dtype=torch.float32, device=grad_out.device)
    _decoder_unshuffle_bwd_kernel[(row_programs, cdiv(D, block_d))](
        grad_out, ids_restore, grad_x, mask_partial, num_rows, L, K, D,
        BLOCK_ROWS=shape.block_rows, BLOCK_D=block_d, ROW_TILES=shape.row_tiles, num_warps=shape.num_warps,
    )
    grad_mask_token = mask_partial.sum(0).to(mask_token_dtype).view(1, 1, D)
    return grad_x, grad_mask_token


# ---------------------------------------------------------------------------------------------
# Autograd and the torch custom op (so torch.compile traces around the kernels)
# ---------------------------------------------------------------------------------------------


class DecoderUnshuffle(torch.autograd.Function):
    """Autograd of the unshuffle; its setup_context/backward are also the custom op's autograd."""

    @staticmethod
    def forward(x, mask_token, ids_restore, pos_embed):
        return decoder_unshuffle_forward(x, mask_token, ids_restore, pos_embed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mask_token, ids_restore, pos_embed = inputs
        ctx.save_for_backward(ids_restore)
        ctx.dtypes = (x.dtype, mask_token.dtype, pos_embed.dtype)
        ctx.num_visible = x.shape[1] - 1

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_out):
        (ids_restore,) = ctx.saved_tensors
        x_dtype, mask_token_dtype, pos_dtype = ctx.dtypes
        backward = decoder_unshuffle_backward if getattr(ctx, "eager", False) else torch.ops.fastmae.decoder_unshuffle_backward
        grad_x, grad_mask_token = backward(
            grad_out.contiguous(), ids_restore, ctx.num_visible, x_dtype, mask_token_dtype
        )
        # pos_embed is frozen in MAE; its gradient (a batch sum) is only formed when asked for.
        grad_pos = grad_out.sum(0, keepdim=True).to(pos_dtype) if ctx.needs_input_grad[3] else None
        return grad_x, grad_mask_token, None, grad_pos


@torch.library.custom_op("fastmae::decoder_unshuffle", mutates_args=())
def _decoder_unshuffle_op(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    return decoder_unshuffle_forward(x, mask_token, ids_restore, pos_embed)


@_decoder_unshuffle_op.register_fake
def _(x, mask_token, ids_restore, pos_embed):
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)
    return x.new_empty((x.shape[0], ids_restore.shape[1] + 1, x.shape[2]), dtype=out_dtype)


@torch.library.custom_op("fastmae::decoder_unshuffle_backward", mutates_args=())
def _decoder_unshuffle_backward_op(
    grad_out: torch.Tensor, ids_restore: torch.Tensor, num_visible: int,
    x_dtype: torch.dtype, mask_token_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return decoder_unshuffle_backward(grad_out, ids_restore, num_visible, x_dtype, mask_token_dtype)


@_decoder_unshuffle_backward_op.register_fake
def _(grad_out, ids_restore, num_visible, x_dtype, mask_token_dtype):
    N, _, D = grad_out.shape
    grad_x = grad_out.new_empty((N, num_visible + 1, D), dtype=x_dtype)
    return grad_x, grad_out.new_empty((1, 1, D), dtype=mask_token_dtype)


torch.library.register_autograd(
    "fastmae::decoder_unshuffle", DecoderUnshuffle.backward, setup_context=DecoderUnshuffle.setup_context
)
DecoderUnshuffleEager = eager_autograd(DecoderUnshuffle)


def decoder_unshuffle_triton(
    x: torch.Tensor,  # [N, 1+K, Dd]
    mask_token: torch.Tensor,  # [1, 1, Dd]
    ids_restore: torch.Tensor,  # [N, L] int64, a permutation of 0..L-1 per row (checked on the CPU only: no sync)
    pos_embed: torch.Tensor,  # [1, 1+L, Dd]
) -> torch.Tensor:  # [N, 1+L, Dd]
    """The fused unshuffle (Triton); same values as ``decoder_unshuffle_reference``."""
    if torch.compiler.is_compiling():
        _check_inputs(x, mask_token, ids_restore, pos_embed)  # traced with fake tensors: the launcher checks nothing
        return torch.ops.fastmae.decoder_unshuffle(x, mask_token, ids_restore, pos_embed)
    return DecoderUnshuffleEager.apply(x, mask_token, ids_restore, pos_embed)
