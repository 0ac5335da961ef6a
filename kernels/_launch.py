"""What the kernel launchers share: input checks, block sizes, and the patch address helper.

Block sizes follow one rule: on a GPU a program holds a few thousand elements (enough loads in
flight to hide memory latency); under the Triton interpreter (TRITON_INTERPRET=1, ~1 ms per program
instance) a program holds as many rows as fit a numpy-sized tile, so tests launch few programs.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastmae.kernels import KERNEL_DTYPES, check_interpreter_versions
from fastmae.kernels.cross_compile import active_compile_only_driver

# Triton reads TRITON_INTERPRET when a kernel is decorated, at import: later changes do not apply.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return _INTERPRETING


# Host-side launch arithmetic on plain ints. An eager training step launches a few hundred kernels
# and can be paced by the host; triton.cdiv and triton.next_power_of_2 are constexpr functions whose
# calls cost ~2 us of host time each (Triton 3.9), these ~0.1 us.
def cdiv(a: int, b: int) -> int:
    return -(a // -b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device, default: int = 132) -> int:
    """Streaming multiprocessors of ``device``; ``default`` (an H100's) off CUDA, where the kernels only
    run interpreted or compile for a GPU that is not there."""
    if device.type != "cuda":
        return default
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


# The interpreter's fp32 -> bf16 cast truncates; GPUs round to nearest even. Kernels cast through
# ``cast_rtne`` so the interpreter rounds like the hardware (and like torch).
INTERPRETER = tl.constexpr(_INTERPRETING)


def check_tensor(
    name: str,
    t: torch.Tensor,
    shape: tuple | None = None,
    dtypes: tuple = KERNEL_DTYPES,
    device: torch.device | None = None,
    contiguous: bool = True,
) -> None:
    """Raise ValueError naming ``name``, its shape and what was expected. ``None`` in shape: any size."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        ok = t.ndim == len(shape) and all(want is None or want == got for want, got in zip(shape, t.shape))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} (shape {list(t.shape)}) must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} (shape {list(t.shape)}) is on {t.device}, expected {device} like the other inputs")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} (shape {list(t.shape)}, strides {list(t.stride())}) must be contiguous")


def check_kernel_device(device: torch.device) -> None:
    if _INTERPRETING:
        check_interpreter_versions()
    # under a CompileOnlyDriver the kernels compile for a GPU and nothing reads the tensors
    if device.type != "cuda" and not interpreting() and active_compile_only_driver() is None:
        raise ValueError(
            f"the Triton kernels need CUDA tensors (got {device}); on CPU they run only through the "
            "interpreter (TRITON_INTERPRET=1 before triton is imported)"
        )


def check_patch_grid(imgs: torch.Tensor, patch_size: int, in_chans: int | None = None) -> tuple[int, int]:
    """imgs [N, C, H, W] cut into p x p patches -> (L, grid width)."""
    if imgs.ndim != 4:
        raise ValueError(f"imgs must be [N, C, H, W], got shape {list(imgs.shape)}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    _, C, H, W = imgs.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"imgs shape {list(imgs.shape)}: H and W must be multiples of patch_size {patch_size}")
    if in_chans is not None and C != in_chans:
        raise ValueError(f"imgs shape {list(imgs.shape)} has {C} channels, expected {in_chans}")
    if imgs.dtype not in KERNEL_DTYPES:
        raise ValueError(f"imgs (shape {list(imgs.shape)}) must be float32/bfloat16/float16, got {imgs.dtype}")
    # offsets inside one image are int32 in the kernels (int64 costs registers); across images int64
    if sum((size - 1) * abs(stride) for size, stride in zip(imgs.shape[1:], imgs.stride()[1:])) >= 2**31:
        raise ValueError(f"imgs shape {list(imgs.shape)}, strides {list(imgs.stride())}: one image spans 2**31 "
                         "elements or more, beyond the kernels' 32-bit offsets inside an image")
    return (H // patch_size) * (W // patch_size), W // patch_size


def check_patch_ids(name: str, ids: torch.Tensor, batch: int, num_patches: int, device: torch.device) -> None:
    """ids [N, K] int64 patch indices, rows may be strided (a slice of ids_shuffle) but each row dense.
    Their values are checked where reading them costs nothing (``ids_readable``)."""
    check_tensor(name, ids, (batch, None), dtypes=(torch.int64,), device=device, contiguous=False)
    if ids.shape[1] > 1 and ids.stride(1) != 1:
        raise ValueError(
            f"{name} (shape {list(ids.shape)}, strides {list(ids.stride())}) must be dense along its last dim"
        )
    if ids.shape[1] > num_patches:
        raise ValueError(f"{name} shape {list(ids.shape)} picks more than the {num_patches} patches of an image")
    if ids_readable(ids):
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_patches:
            raise ValueError(f"{name} holds patch ids from {low} to {high}, outside 0..{num_patches - 1}")


def check_permutations(name: str, ids: torch.Tensor) -> None:
    """ids [N, L]: every row a permutation of 0..L-1, where the values can be read (``ids_readable``)."""
    if ids_readable(ids) and not torch.equal(ids.sort(dim=1).values,
                                             torch.arange(ids.shape[1], device=ids.device).expand_as(ids)):
        raise ValueError(f"{name} must hold a permutation of 0..{ids.shape[1] - 1} in every row")


def ids_readable(ids: torch.Tensor) -> bool:
    """Whether index values can be checked: on the CPU (the interpreter), where reading them back stalls
    no GPU, and outside tracing (fake tensors hold no values). On CUDA they are the caller's to get right
    (the model's come from argsort): a wrong id reads or writes another row's memory."""
    return (ids.device.type == "cpu" and ids.numel() > 0 and not torch.compiler.is_compiling()
            and not isinstance(ids, torch._subclasses.FakeTensor))


@dataclass(frozen=True)
class RowTiles:
    """How a row-wise kernel covers its rows: tiles of ``block_rows`` rows, ``row_tiles`` tiles per
    program, ``num_warps`` warps. Each launcher picks one in a single function (``_launch_shape``),
    which ``benchmarks/kernel_shapes_gpu.py`` replaces to time the alternatives on a GPU."""

    block_rows: int
    row_tiles: int
    num_warps: int


def row_blocks(num_cols: int, gpu_elements: int = 4096, interpreter_elements: int = 1 << 16) -> tuple[int, int]:
    """(rows per tile, columns per tile) for row-wise kernels over rows of ``num_cols`` values."""
    block_cols = next_power_of_2(num_cols)
    budget = interpreter_elements if interpreting() else gpu_elements
    return max(1, budget // block_cols), block_cols


def one_tile_per_program(num_cols: int) -> RowTiles:
    """On a GPU: ``row_blocks``' tile of about 4096 values, one per program, 4 warps. The fastest of the 16
    launch shapes ``benchmarks/kernel_shapes_gpu.py`` timed on an H100 for both row-wise memory-bound kernels
    that take it (the decoder input and the loss)."""
    return RowTiles(row_blocks(num_cols)[0], 1, 4)


def num_warps_for(block_elements: int) -> int:
    return 8 if block_elements >= 4096 else 4


@triton.jit
def patch_origin(n, patch_id, grid_w, s_n, s_h, s_w, PATCH: tl.constexpr):
    """Offset (int64) of the top-left pixel of patch ``patch_id`` of image ``n`` (channel 0)."""
    n = n.to(tl.int64)
    patch_id = patch_id.to(tl.int64)
    row = patch_id // grid_w
    col = patch_id % grid_w
    return n * s_n + row * PATCH * s_h + col * PATCH * s_w


@triton.jit
def cast_rtne(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even also under the interpreter (for bf16 outputs)."""
    if INTERPRETER and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


def first_derivative_only(backward):
    """A kernel op's backward, which has no derivative of its own. Asked for one (create_graph=True:
    the backward runs with grad mode on), it raises, naming the way out. torch's ``once_differentiable``
    instead lets ``autograd.grad(..., allow_unused=True)`` return None, a zero second derivative."""

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError("fastmae's Triton kernels have no second derivative (backward with create_graph=True): "
                               "build the model with kernels='torch' to differentiate twice")
        with torch.no_grad():
            return backward(ctx, *grads)

    return checked


def eager_autograd(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """``function`` (forward, setup_context, backward: the custom op's autograd) as an old-style
    autograd.Function entered through ``apply``: what eager calls run instead of the torch custom op.

    The custom op is what torch.compile traces around; eagerly its dispatch costs tens of
    microseconds of host time per call and per backward (add + LayerNorm, forward and backward,
    launched under ``CompileOnlyDriver`` so nothing runs: 340-395 us through the op, 220-250 us
    without it, 175 us with the plain-int launch arithmetic above), and an eager step whose launches
    take longer than the GPU's work is paced by the host. ``ctx.eager`` lets the backward call its
    launcher directly as well.
    """

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = function.forward(*inputs)
            function.setup_context(ctx, inputs, output)
            ctx.eager = True
            return output

        backward = staticmethod(function.backward)

    Eager.__name__ = Eager.__qualname__ = f"{function.__name__}Eager"
    return Eager
