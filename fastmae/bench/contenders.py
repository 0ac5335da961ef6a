"""The implementations the step benchmark compares, each as one training step on the same batch.

A training step is forward + backward + optimizer step + zero_grad, as the trainer does it:

- ``fastmae``: the engine (kernels ``auto``: Triton on CUDA; SDPA attention), autocast in the run's
  dtype, fused AdamW; the head on the removed patches only (``full_pred=False``).
- ``fastmae+compile``: the same under ``torch.compile``.
- ``fastmae+cudagraph`` (CUDA): the same eager step captured once as a CUDA graph and replayed
  (``fastmae.train.cuda_graph``, ``fastmae pretrain --cuda_graph``): one launch per step.
- ``naive w/[M]`` (and ``+compile``, ``+cudagraph``): the same engine with mask tokens through the encoder, the
  paper's baseline "w/ [M]", so its ratio to ``fastmae`` measures the method.
- ``reference-style``: ``ReferenceStyleMAE``, fp16 autocast with a GradScaler when the run is in
  half precision (the reference's AMP; fp32 without a scaler when the run is fp32), and AdamW as
  main_pretrain.py builds it, ``torch.optim.AdamW(groups, lr, betas)``: torch's default implementation,
  multi-tensor (foreach) on CUDA, not fused. (Results before 2026-11-25 used a for-loop AdamW, slower
  than what the reference gets on a current torch; their rows say so.)
- ``hf-vitmae``: transformers' ViTMAEForPreTraining (SDPA), under the same autocast and fused AdamW
  as fastmae, so the difference is the model code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from fastmae.compiling import CompileConfig, compile_for_training
from fastmae.flops import train_flops_per_image
from fastmae.models import MAEConfig, MaskedAutoencoderViT
from fastmae.train.cuda_graph import DEFAULT_WARMUP_STEPS, GraphedTrainStep
from fastmae.train.optim import ADAMW_BETAS, build_optimizer, param_groups
from fastmae.train.trainer import train_step

LEARNING_RATE = 1.5e-4  # the recipe's base lr; its value does not change the speed
WEIGHT_DECAY = 0.05
CONTENDER_NAMES = ("fastmae", "fastmae+compile", "fastmae+cudagraph", "naive w/[M]", "naive w/[M]+compile",
                   "naive w/[M]+cudagraph", "reference-style", "hf-vitmae")
CUDA_GRAPH_CONTENDERS = ("fastmae+cudagraph", "naive w/[M]+cudagraph")


class TrainStep:
    """One optimisation step of ``model`` on a batch: imgs [N, C, H, W] -> detached loss."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 autocast_dtype: torch.dtype | None, mask_ratio: float, forward_kwargs: dict | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None, compiled: CompileConfig | None = None):
        self.model = model
        self.compiled = compiled  # None runs eagerly
        self.forward = compile_for_training(model, model, compiled) if compiled else model
        self.optimizer = optimizer
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.mask_ratio = mask_ratio
        self.forward_kwargs = forward_kwargs or {}
        self.grad_scaler = grad_scaler

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss = self.forward(imgs, self.mask_ratio, **self.forward_kwargs)[0]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class EngineTrainStep(TrainStep):
    """fastmae's contenders time the trainer's own ``train_step``, so the benchmark measures what
    ``fastmae pretrain`` runs (head on the removed patches only, no host sync)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 autocast_dtype: torch.dtype | None, mask_ratio: float, compiled: CompileConfig | None = None):
        super().__init__(model, optimizer, device, autocast_dtype, mask_ratio, compiled=compiled)
        # as the trainer's: loss scaling in fp16 (its overflow check included), none in bf16 / fp32
        self.loss_scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        losses = train_step(self.forward, self.optimizer, self.loss_scaler, [(imgs, None)], self.mask_ratio,
                            self.autocast_dtype, self.compiled)
        return losses[0]


@dataclass
class Contender:
    name: str
    description: str
    precision: str
    train_flops_per_image: float  # analytic, of what this implementation computes
    build: Callable[[], Callable[[torch.Tensor], torch.Tensor]]  # -> a step: imgs -> loss
    # steps before the step is steady, whatever --warmup says: a CUDA graph's eager warm-ups and its capture
    # (which synchronises and empties the cache) must not be timed
    untimed_steps: int = 0


GRAPH_UNTIMED_STEPS = DEFAULT_WARMUP_STEPS + 1  # the eager warm-ups, then the step that captures


def _autocast_dtype(dtype: torch.dtype) -> torch.dtype | None:
    return None if dtype == torch.float32 else dtype


def fastmae_step(config: MAEConfig, device: torch.device, dtype: torch.dtype, mask_ratio: float,
                 encoder_mask_tokens: bool = False, compiled: CompileConfig | None = None, kernels: str = "auto",
                 attn: str = "sdpa", cuda_graph: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The engine's training step (``encoder_mask_tokens``: the naive baseline; ``compiled``: None eager;
    ``cuda_graph``: the eager step replayed as a CUDA graph)."""
    if compiled:
        # a fresh compilation per contender: models compiled earlier in the run must not use up
        # dynamo's recompile limit (past it, torch.compile silently falls back to eager)
        torch._dynamo.reset()
    model = MaskedAutoencoderViT(**dataclasses.asdict(config), kernels=kernels, attn=attn,
                                 encoder_mask_tokens=encoder_mask_tokens).to(device)
    optimizer = build_optimizer(model, LEARNING_RATE, WEIGHT_DECAY)
    if cuda_graph:
        if compiled:
            raise ValueError("a CUDA-graph step captures the eager model; torch.compile has its own (reduce-overhead)")
        graphed = GraphedTrainStep(model, optimizer, mask_ratio, _autocast_dtype(dtype))
        return lambda imgs: graphed([(imgs, None)])[0]
    return EngineTrainStep(model, optimizer, device, _autocast_dtype(dtype), mask_ratio, compiled)


def _reference_style_step(config: MAEConfig, device, dtype, mask_ratio):
    from fastmae.bench.reference_style import ReferenceStyleMAE

    model = ReferenceStyleMAE.initialised(config).to(device)
    # no foreach/fused arguments: torch's default, as main_pretrain.py gets it
    optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LEARNING_RATE, betas=ADAMW_BETAS)
    half = dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=half) if half else None
    return TrainStep(model, optimizer, device, torch.float16 if half else None, mask_ratio, grad_scaler=scaler)


def _hf_step(config: MAEConfig, device, dtype, mask_ratio):
    from fastmae.bench.hf_vitmae import HFViTMAELoss, build_hf_vitmae

    model = HFViTMAELoss(build_hf_vitmae(config, mask_ratio)).to(device)
    optimizer = build_optimizer(model, LEARNING_RATE, WEIGHT_DECAY)
    return TrainStep(model, optimizer, device, _autocast_dtype(dtype), mask_ratio)


def build_contenders(config: MAEConfig, device: torch.device, dtype: torch.dtype, mask_ratio: float,
                     names: tuple[str, ...], kernels: str = "auto", attn: str = "sdpa",
                     compiled: CompileConfig = CompileConfig()) -> list[Contender]:
    """The contenders ``names`` (a subset of CONTENDER_NAMES, in that order), not built yet."""
    unknown = [n for n in names if n not in CONTENDER_NAMES]
    if unknown:
        raise ValueError(f"unknown implementations {unknown}; choose from {list(CONTENDER_NAMES)}")
    amp = "fp32" if dtype == torch.float32 else f"{str(dtype).removeprefix('torch.')} autocast"
    # the engine's rows step as the trainer does: with loss scaling in fp16
    engine_amp = amp + (" + GradScaler" if dtype == torch.float16 else "")
    mae_flops = train_flops_per_image(config, mask_ratio)
    naive_flops = train_flops_per_image(config, mask_ratio, encoder_mask_tokens=True)
    # reference-style and HF embed every patch and predict every patch
    full_flops = train_flops_per_image(config, mask_ratio, full_pred=True, embed_all_patches=True)
    table = {
        "fastmae": Contender(
            "fastmae", f"fastmae engine (kernels={kernels}, attn={attn}), fused AdamW", engine_amp, mae_flops,
            lambda: fastmae_step(config, device, dtype, mask_ratio, False, None, kernels, attn)),
        "fastmae+compile": Contender(
            "fastmae+compile", f"fastmae engine, {compiled.describe()}", engine_amp, mae_flops,
            lambda: fastmae_step(config, device, dtype, mask_ratio, False, compiled, kernels, attn)),
        "fastmae+cudagraph": Contender(
            "fastmae+cudagraph", "fastmae engine, the eager step replayed as one CUDA graph", engine_amp, mae_flops,
            lambda: fastmae_step(config, device, dtype, mask_ratio, False, None, kernels, attn, cuda_graph=True),
            GRAPH_UNTIMED_STEPS),
        "naive w/[M]": Contender(
            "naive w/[M]", "same engine, mask tokens through the encoder (paper's baseline)", engine_amp, naive_flops,
            lambda: fastmae_step(config, device, dtype, mask_ratio, True, None, kernels, attn)),
        "naive w/[M]+compile": Contender(
            "naive w/[M]+compile", f"naive baseline, {compiled.describe()}", engine_amp, naive_flops,
            lambda: fastmae_step(config, device, dtype, mask_ratio, True, compiled, kernels, attn)),
        "naive w/[M]+cudagraph": Contender(
            "naive w/[M]+cudagraph", "naive baseline, the eager step replayed as one CUDA graph", engine_amp, naive_flops,
            lambda: fastmae_step(config, device, dtype, mask_ratio, True, None, kernels, attn, cuda_graph=True),
            GRAPH_UNTIMED_STEPS),
        "reference-style": Contender(
            "reference-style", "conv on all patches + gather, softmax(QK^T)V, "
            + ("" if dtype == torch.float32 else "GradScaler, ") + "torch's default AdamW (foreach)",
            "fp32" if dtype == torch.float32 else "fp16 autocast + GradScaler", full_flops,
            lambda: _reference_style_step(config, device, dtype, mask_ratio)),
        "hf-vitmae": Contender(
            "hf-vitmae", "transformers ViTMAEForPreTraining (sdpa), fused AdamW", amp, full_flops,
            lambda: _hf_step(config, device, dtype, mask_ratio)),
    }
    return [table[n] for n in CONTENDER_NAMES if n in names]
