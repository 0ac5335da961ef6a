"""fastmae's fused kernels, one file per op (installed as ``fastmae.kernels``).

Each op file holds the Triton kernels, the launcher and the ``torch.autograd.Function``, and imports
the plain-PyTorch reference that states the semantics from ``reference.py``, which imports without
Triton (a CPU-only install runs the references). The model calls the four functions below; one
switch picks the path:

- ``"torch"``: the PyTorch reference,
- ``"triton"``: the Triton kernels (on CUDA; on CPU only through the interpreter, TRITON_INTERPRET=1,
  or compiled for a GPU and not run, under ``cross_compile.CompileOnlyDriver``),
- ``"auto"``: Triton on CUDA when Triton is installed, the reference otherwise.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re

import torch

KERNEL_CHOICES = ("auto", "triton", "torch")


# Looked up once: resolve_kernels runs inside the traced forward, and dynamo before torch 2.12
# cannot trace importlib.util.find_spec (a graph break, and an error under fullgraph=True).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_incompatibility(triton_version: str, numpy_version: str) -> str | None:
    """Why the Triton interpreter of ``triton_version`` cannot run beside ``numpy_version``, or None.

    Triton 3.6 and older read a runtime int (a loop bound) as ``int()`` of a one-element array, which
    NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.7
    squeezes the array first. On a GPU the kernels compile and are unaffected.
    """
    def release(version: str) -> tuple[int, ...]:  # "2.4.0rc1" -> (2, 4)
        return tuple(int(part) for part in re.findall(r"\d+", version)[:2])

    if release(triton_version) < (3, 7) and release(numpy_version) >= (2, 4):
        return (f"the Triton interpreter of triton {triton_version} fails with numpy {numpy_version} (numpy 2.4 "
                "no longer converts one-element arrays to ints, which triton before 3.7 relies on): "
                "pip install 'numpy<2.4', or triton>=3.7 where torch allows it")
    return None


@functools.lru_cache(maxsize=None)
def check_interpreter_versions() -> None:
    """Raise ValueError if this environment's Triton interpreter cannot run the kernels (checked once)."""
    import numpy

    problem = interpreter_incompatibility(importlib.metadata.version("triton"), numpy.__version__)
    if problem is not None:
        raise ValueError(problem)


def _compiling_only() -> bool:
    """A CompileOnlyDriver is active: Triton launches compile for a GPU and do not run (any device)."""
    if not triton_available():
        return False
    from fastmae.kernels.cross_compile import active_compile_only_driver

    return active_compile_only_driver() is not None


def check_kernels_choice(choice: str) -> str:
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {choice!r}")
    if choice == "triton" and not triton_available():
        raise ValueError("kernels='triton' asked for, but Triton is not installed (pip install 'fastmae[triton]')")
    return choice


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton kernels compute in


def resolve_kernels(choice: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The path ("triton" or "torch") that ``choice`` takes for tensors on ``device`` of ``dtype`` (the
    model's parameters'; None: a kernel dtype). The kernels compute in fp32/bf16/fp16: a float64 model
    (the reference comparisons) takes the PyTorch path under "auto". Under torch.func's transforms every
    choice takes the PyTorch path."""
    check_kernels_choice(choice)
    if choice == "torch":
        return "torch"
    if torch._C._are_functorch_transforms_active():
        # torch.func (grad, vjp, vmap, functional_call under them) refuses the kernels' autograd, an
        # old-style Function in the custom ops too: the PyTorch references compute the same values there
        return "torch"
    if dtype is not None and dtype not in KERNEL_DTYPES:
        if choice == "triton":
            raise ValueError(f"kernels='triton' computes in float32, bfloat16 or float16, the model is in {dtype}: "
                             "use kernels='auto' or 'torch'")
        return "torch"
    if device.type == "cuda":
        return "triton" if triton_available() else "torch"
    if choice == "triton":
        if _compiling_only():
            return "triton"
        if triton_interpreter_on():
            check_interpreter_versions()
            return "triton"
        raise ValueError(
            f"kernels='triton' on device {device}: Triton runs on CPU only through its interpreter; "
            "set TRITON_INTERPRET=1 (tests) or use kernels='auto'/'torch'"
        )
    return "torch"


def visible_patch_embed(imgs, ids_keep, weight, bias, pos_embed, cls_token, patch_size: int, path: str = "torch"):
    """Patch projection of the kept patches only, plus position embeddings and the cls token.

    imgs [N, C, H, W], ids_keep [N, K] (None: all L patches in order), weight [D, C, p, p],
    bias [D], pos_embed [1, 1+L, D], cls_token [1, 1, D] -> [N, 1+K, D].
    """
    if path == "triton":
        from fastmae.kernels.encoder_input import visible_patch_embed_triton

        return visible_patch_embed_triton(imgs, ids_keep, weight, bias, pos_embed, cls_token, patch_size)
    from fastmae.kernels.reference import visible_patch_embed_reference

    return visible_patch_embed_reference(imgs, ids_keep, weight, bias, pos_embed, cls_token, patch_size)


def decoder_unshuffle(x, mask_token, ids_restore, pos_embed, path: str = "torch"):
    """x [N, 1+K, Dd], mask_token [1, 1, Dd], ids_restore [N, L], pos_embed [1, 1+L, Dd] -> [N, 1+L, Dd]."""
    if path == "triton":
        from fastmae.kernels.decoder_input import decoder_unshuffle_triton

        return decoder_unshuffle_triton(x, mask_token, ids_restore, pos_embed)
    from fastmae.kernels.reference import decoder_unshuffle_reference

    return decoder_unshuffle_reference(x, mask_token, ids_restore, pos_embed)


def masked_patch_loss(pred, imgs, patch_size: int, norm_pix_loss: bool, patch_ids=None, weight=None, path: str = "torch"):
    """Mean squared error per patch against the (optionally per-patch normalised) pixels.

    pred [N, M, p*p*C] for the patches patch_ids [N, M] (None: all L in order); weight [N, M]
    (None: all ones) -> scalar sum(err * weight) / sum(weight).
    """
    if path == "triton":
        from fastmae.kernels.patch_loss import masked_patch_loss_triton

        return masked_patch_loss_triton(pred, imgs, patch_size, norm_pix_loss, patch_ids, weight)
    from fastmae.kernels.reference import masked_patch_loss_reference

    return masked_patch_loss_reference(pred, imgs, patch_size, norm_pix_loss, patch_ids, weight)


def add_layer_norm(x, branch, weight, bias, eps: float, out_dtype=None, path: str = "torch"):
    """Residual add and LayerNorm of the sum: -> (x + branch, layer_norm(x + branch) in out_dtype).

    x [..., D], branch [..., D] (None: normalise x alone; the residual returned is x), weight [D],
    bias [D]; out_dtype None: the residual's dtype.
    """
    if path == "triton":
        from fastmae.kernels.layer_norm import add_layer_norm_triton

        return add_layer_norm_triton(x, branch, weight, bias, eps, out_dtype)
    from fastmae.kernels.reference import add_layer_norm_reference

    return add_layer_norm_reference(x, branch, weight, bias, eps, out_dtype)
