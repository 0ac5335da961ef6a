"""How the engine is compiled for training: which part torch.compile sees, and in which mode.

Scopes:
- ``model``: dynamo traces the whole forward, the Triton kernels as single custom-op nodes, so
  inductor fuses across block boundaries too (position rows, final norms, head). Compile time grows
  with depth (minutes for ViT-H).
- ``blocks``: each transformer block is compiled in place; inductor fuses its LayerNorms, GELU,
  residual adds and the attention's reshapes. Blocks of one shape share one compiled graph (one for
  the encoder's 1+K tokens, one for the decoder's 1+L), so ViT-H compiles as fast as ViT-B; the
  kernels and the few ops between them run eagerly.

Modes are torch.compile's (inductor only). ``reduce-overhead`` replays CUDA graphs, which removes
the per-kernel launch cost that the encoder's short sequences (50 tokens for ViT/16 at 224 px) make
visible; the ``max-autotune`` modes search GEMM configurations (long compiles).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

COMPILE_SCOPES = ("model", "blocks")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileConfig:
    scope: str = "model"
    mode: str = "default"
    backend: str = "inductor"  # "aot_eager" traces without generating code (tests, debugging)

    def __post_init__(self):
        if self.scope not in COMPILE_SCOPES:
            raise ValueError(f"compile scope must be one of {COMPILE_SCOPES}, got {self.scope!r}")
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {self.mode!r}")
        if self.mode != "default" and self.backend != "inductor":
            raise ValueError(f"compile mode {self.mode!r} is an inductor mode; the backend is {self.backend!r}")

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.mode in ("reduce-overhead", "max-autotune")

    @property
    def tag(self) -> str:
        """A file-name part for settings other than torch.compile's defaults on the whole model."""
        return "" if (self.scope, self.mode) == ("model", "default") else f"_compile-{self.scope}-{self.mode}"

    def describe(self) -> str:
        return f"torch.compile {self.scope}, backend {self.backend}, mode {self.mode}"


def compile_for_training(train_model: nn.Module, model: nn.Module, cfg: CompileConfig) -> nn.Module:
    """The module to call in training. ``train_model`` is ``model`` or a DDP wrapper of it; with scope
    "blocks" the blocks of ``model`` are compiled in place (its state_dict keys stay the same)."""
    options = {"backend": cfg.backend, "mode": None if cfg.mode == "default" else cfg.mode}
    if cfg.scope == "model":
        return torch.compile(train_model, **options)
    blocks = [*getattr(model, "blocks", ()), *getattr(model, "decoder_blocks", ())]
    if not blocks:
        raise ValueError(f"compile scope 'blocks': {type(model).__name__} has no blocks or decoder_blocks")
    for block in blocks:
        # static shapes: the encoder and decoder blocks differ in width and length, and with
        # dynamic=None the second shape would turn on dynamic-shape recompilation for every block
        block.compile(dynamic=False, **options)
    return train_model


def mark_step_begin(cfg: CompileConfig | None) -> None:
    """A new iteration for CUDA-graph replays: outputs of the previous one may be overwritten."""
    if cfg is not None and cfg.uses_cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
