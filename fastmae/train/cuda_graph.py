"""The training step captured once as CUDA graphs and replayed: forward, backward, AdamW update.

Why: an eager step launches a few thousand kernels, and on the H100 machine the host took longer to
launch them than the GPU took to run them. ViT-L's eager step took 119 ms at batch 64 and 106 ms at
batch 256, and the forward of its encoder 39 ms at batch 64 against 19 ms at batch 256. The eager
steps took about 3.5 ms per transformer block whatever the width: ViT-B (20 blocks) 67 ms and ViT-L
(32) 111 ms at batch 256, ViT-H (40) 143 ms at batch 128, each with a wide spread, where the step
with the PyTorch references instead of the Triton kernels took 124 ms with none
(benchmarks/results/*_20261124.json; the profiler's GPU-busy share, not yet measured, will say
how much of the step the GPU waits). A replay is one launch for the whole step.

How (torch's whole-network capture, docs: notes/cuda "whole-network capture"):
1. the first ``warmup_steps`` steps run eagerly on a side stream. They are real training steps, and
   what must exist before a capture is created there: Triton's compiled and autotuned kernels,
   cuBLAS's workspaces, the optimizer's state;
2. the next step's first micro-batch and its masking noise are copied into static buffers and the step
   is captured (``GraphedTrainStep`` says how, with and without gradient accumulation);
3. every step from then on copies each micro-batch and its noise into the static buffers and replays.

A replay repeats exactly the captured kernels, so what it cannot change is checked: every batch has
the captured shape and dtype (the loaders drop the last partial batch), no GradScaler (its
skip-on-overflow reads the device), no DDP (its all-reduce hooks are not captured here), no
torch.compile (``--compile_mode reduce-overhead`` is its own CUDA-graph route). The learning rate
reaches the replays as a device tensor that ``set_lr`` fills in place.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn

from fastmae.compiling import CompileConfig

DEFAULT_WARMUP_STEPS = 3  # torch's whole-network example; Triton autotunes in the first


def check_cuda_graph_support(device: torch.device, precision: str, distributed: bool,
                             compiled: CompileConfig | None) -> None:
    """Raise ValueError naming the setting that a captured training step cannot honour."""
    if device.type != "cuda":
        raise ValueError(f"--cuda_graph captures the training step as a CUDA graph: it needs a CUDA device, "
                         f"the run is on {device}")
    if precision == "fp16":
        raise ValueError("--cuda_graph cannot replay fp16's GradScaler (it skips steps by reading the device): "
                         "use --precision bf16 (the default on CUDA) or fp32")
    if distributed:
        raise ValueError("--cuda_graph runs in one process only: DDP's gradient all-reduce is not captured")
    if compiled is not None:
        raise ValueError("--cuda_graph captures the eager step; with --compile use --compile_mode "
                         "reduce-overhead, torch.compile's own CUDA graphs")


def make_optimizer_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Let ``optimizer.step()`` be captured: capturable groups, and each lr a device tensor, so a new lr
    reaches the replays (``fastmae.train.schedule.set_lr`` fills it in place). Call it after loading a
    checkpoint: ``load_state_dict`` restores the saved groups' settings."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        lr = group["lr"]
        if not (isinstance(lr, torch.Tensor) and lr.device == device):
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)


class CudaGraphRunner:
    """The CUDA side of ``GraphedTrainStep``: warm-up on a side stream, captures, replays."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side_stream = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def warmup(self, *inputs: torch.Tensor):
        """Run eager work on the side stream, ordered after and before the current stream's work."""
        current = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(current)
        with torch.cuda.stream(self.side_stream):
            yield
        current.wait_stream(self.side_stream)
        for tensor in inputs:  # made on the current stream, read on the side stream
            tensor.record_stream(self.side_stream)

    def capture(self, body: Callable[[], torch.Tensor | None]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor | None]:
        """-> (the graph, what ``body`` returned: memory each replay rewrites)."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loaders' threads (DALI's, the side-stream copies) keep using CUDA meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = body()
        return graph, out

    def replay(self, graph: torch.cuda.CUDAGraph) -> None:
        graph.replay()


class GraphedTrainStep:
    """One optimizer step over ``accum_iter`` micro-batches per call, as ``train_step`` computes it (no
    GradScaler), replayed from CUDA graphs after ``warmup_steps`` eager steps.

    One micro-batch per step: a single graph of forward, backward and update, with the gradients set to
    None before the capture so that backward writes them (nothing to zero, nothing to add). Several: a
    graph of forward and backward, which adds into gradients that exist before its capture, replayed
    per micro-batch; then a graph of the update and the zeroing of the gradients.

    ``runner``: the CUDA side (a ``CudaGraphRunner`` for the model's device); tests pass one that runs
    the captured bodies eagerly.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, mask_ratio: float,
                 autocast_dtype: torch.dtype | None, accum_iter: int = 1, warmup_steps: int = DEFAULT_WARMUP_STEPS,
                 runner: CudaGraphRunner | None = None):
        if warmup_steps < 1:
            raise ValueError(f"a CUDA-graph step needs at least one eager warm-up step, got {warmup_steps}")
        if accum_iter < 1:
            raise ValueError(f"accum_iter must be positive, got {accum_iter}")
        self.device = next(model.parameters()).device
        if runner is None:
            if self.device.type != "cuda":
                raise ValueError(f"a CUDA-graph step needs the model on a CUDA device, it is on {self.device}")
            runner = CudaGraphRunner(self.device)
        self.model, self.optimizer, self.runner = model, optimizer, runner
        self.mask_ratio = mask_ratio
        self.autocast_dtype = autocast_dtype
        self.accum_iter = accum_iter
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.static_imgs = self.static_noise = self.static_loss = None
        self.micro_graph = self.update_graph = None
        make_optimizer_capturable(optimizer, self.device)

    @property
    def captured(self) -> bool:
        return self.micro_graph is not None

    def __call__(self, micro_batches) -> torch.Tensor:
        """micro_batches: ``accum_iter`` pairs (imgs [B, C, H, W], noise [B, L] or None: drawn here) -> the
        micro-batches' losses [accum_iter], a device tensor (no sync)."""
        micro_batches = [(imgs, torch.rand(imgs.shape[0], self.model.num_patches, device=imgs.device)
                          if noise is None else noise) for imgs, noise in micro_batches]
        if len(micro_batches) != self.accum_iter:
            raise ValueError(f"the CUDA-graph step accumulates {self.accum_iter} micro-batches per step, "
                             f"got {len(micro_batches)}")
        self.steps += 1
        if self.steps <= self.warmup_steps:
            with self.runner.warmup(*(t for pair in micro_batches for t in pair)):
                losses = torch.stack([self._forward_backward(imgs, noise) for imgs, noise in micro_batches])
                self._update(set_to_none=True)
            return losses.clone()
        if not self.captured:
            self._capture(*micro_batches[0])
        losses = torch.empty(self.accum_iter, device=self.device)
        for index, (imgs, noise) in enumerate(micro_batches):
            self._check_like("the batch", imgs, self.static_imgs)
            self._check_like("the masking noise", noise, self.static_noise)
            self.static_imgs.copy_(imgs)
            self.static_noise.copy_(noise)
            self.runner.replay(self.micro_graph)
            losses[index] = self.static_loss
        if self.update_graph is not None:
            self.runner.replay(self.update_graph)
        return losses

    def _capture(self, imgs: torch.Tensor, noise: torch.Tensor) -> None:
        self.static_imgs, self.static_noise = imgs.clone(), noise.clone()
        if self.accum_iter == 1:
            # backward creates the gradients inside the graph's memory: each replay overwrites them
            self.optimizer.zero_grad(set_to_none=True)

            def forward_backward_update():
                loss = self._forward_backward(self.static_imgs, self.static_noise)
                self.optimizer.step()
                return loss

            self.micro_graph, self.static_loss = self.runner.capture(forward_backward_update)
            return
        # gradients made before the captures: each micro-batch's backward adds into them in place
        for param in self.model.parameters():
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)
        self.micro_graph, self.static_loss = self.runner.capture(
            lambda: self._forward_backward(self.static_imgs, self.static_noise))
        self.update_graph, _ = self.runner.capture(lambda: self._update(set_to_none=False))

    def _forward_backward(self, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        # no autocast cache: a cast weight cached across the capture would outlive its graph memory
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            loss, _, _ = self.model(imgs, self.mask_ratio, noise=noise, full_pred=False)
        (loss / self.accum_iter).backward()  # the gradient of the micro-batches' mean loss
        return loss.detach()

    def _update(self, set_to_none: bool) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @staticmethod
    def _check_like(what: str, tensor: torch.Tensor, static: torch.Tensor) -> None:
        if tensor.shape != static.shape or tensor.dtype != static.dtype or tensor.device != static.device:
            raise ValueError(
                f"the CUDA-graph step was captured for {what} of shape {list(static.shape)}, {static.dtype} on "
                f"{static.device}; got {list(tensor.shape)}, {tensor.dtype} on {tensor.device}. A replay repeats "
                f"the captured shapes: every batch must be full (the loaders drop the last partial batch)")
