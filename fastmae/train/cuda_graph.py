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
skip-on-overflow reads the device), no torch.compile (``--compile_mode reduce-overhead`` is its own
CUDA-graph route). What changes from step to step reaches the replays through device tensors filled
in place: the learning rate (``set_lr``) and the scale of each micro-batch's loss (a step may be given
fewer micro-batches than ``accum_iter``; the trainer's steps are always whole, as the reference's).

Several processes: the model is not wrapped in DDP, whose gradient hooks would run inside the capture.
The gradients are views into one flat buffer (``FlatGradients``) that is averaged across the ranks
between the graph of forward and backward and the graph of the update, by one all-reduce launched
eagerly (one NCCL call a step, on its own stream, no host wait). It is DDP's arithmetic (divide by the
world size, then sum), not overlapped with the backward as DDP's buckets are.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from fastmae.compiling import CompileConfig

DEFAULT_WARMUP_STEPS = 3  # torch's whole-network example; Triton autotunes in the first


CUDA_GRAPH_CHOICES = ("auto", "on", "off")


def cuda_graph_choice(choice: str | bool) -> str:
    """``--cuda_graph``'s value as one of CUDA_GRAPH_CHOICES (True: on, False: off, as before the choice had
    three values), else a ValueError naming it."""
    if isinstance(choice, bool):
        return "on" if choice else "off"
    if choice not in CUDA_GRAPH_CHOICES:
        raise ValueError(f"--cuda_graph must be one of {', '.join(CUDA_GRAPH_CHOICES)}, got {choice!r}")
    return choice


def use_cuda_graph(choice: str | bool, device: torch.device, precision: str, compiled: CompileConfig | None,
                   attn: str, processes: int) -> bool:
    """Whether the run replays its step as a CUDA graph. ``on`` (or True) where the settings allow it, else
    ValueError naming the setting; ``off`` (or False) never; ``auto`` where it was measured to help and its
    path has run on a GPU: CUDA, bf16 or fp32, no torch.compile, PyTorch's attention, one process. (A
    ViT-B/16 training run on an H100 made 4606 img/s replayed against 3001 eager; several processes' one
    all-reduce a step has run with NCCL on one GPU only, and xformers' kernels have not been captured.)"""
    choice = cuda_graph_choice(choice)
    if choice == "on":
        check_cuda_graph_support(device, precision, compiled)
        return True
    return (choice == "auto" and device.type == "cuda" and precision != "fp16" and compiled is None
            and attn in ("sdpa", "math") and processes == 1)


def check_cuda_graph_support(device: torch.device, precision: str, compiled: CompileConfig | None) -> None:
    """Raise ValueError naming the setting that a captured training step cannot honour."""
    if device.type != "cuda":
        raise ValueError(f"--cuda_graph captures the training step as a CUDA graph: it needs a CUDA device, "
                         f"the run is on {device}")
    if precision == "fp16":
        raise ValueError("--cuda_graph cannot replay fp16's GradScaler (it skips steps by reading the device): "
                         "use --precision bf16 (the default on CUDA) or fp32")
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


class FlatGradients:
    """Every trainable parameter's ``.grad`` bound as a view into one flat buffer: gradients that exist
    before a capture (backward adds into them in place), zeroed with one kernel, and averaged across
    ranks with one all-reduce. Nothing may set these gradients to None: a graph keeps their addresses."""

    def __init__(self, params, process_group=None):
        params = [p for p in params if p.requires_grad]
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) != 1:
            raise ValueError(f"one flat gradient buffer needs the parameters in one dtype on one device, "
                             f"got {sorted(map(str, kinds))}")
        (dtype, device), = kinds
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device)
        offset = 0
        for p in params:
            p.grad = self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.process_group = process_group  # None: one process, nothing to average
        self.world_size = 1 if process_group is None else dist.get_world_size(process_group)

    def zero_(self) -> None:
        self.buffer.zero_()

    def all_reduce(self) -> None:
        """The mean over the ranks, as DDP computes it: each rank's gradient divided by the world size,
        then summed."""
        if self.process_group is not None:
            self.buffer.div_(self.world_size)
            dist.all_reduce(self.buffer, group=self.process_group)


def broadcast_from_first_rank(module: nn.Module, process_group) -> None:
    """Every rank starts from the first rank's parameters and buffers, as DDP's constructor makes it."""
    source = dist.get_global_rank(process_group, 0)
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.detach(), source, group=process_group)


class CudaGraphRunner:
    """The CUDA side of ``GraphedTrainStep``: warm-up on a side stream, captures, replays."""

    def __init__(self, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"a CUDA-graph step needs the model on a CUDA device, it is on {device}")
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
        try:
            # thread_local: the loaders' threads (DALI's, the side-stream copies) keep using CUDA meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = body()
        except Exception as err:
            with contextlib.suppress(Exception):
                graph.reset()  # give the capture's private memory pool back
            failure = capture_failure(err)
            if failure is err:
                raise
            raise failure from err
        return graph, out

    def replay(self, graph: torch.cuda.CUDAGraph) -> None:
        graph.replay()


def capture_failure(err: BaseException) -> BaseException:
    """What to raise for an error during a capture: running out of memory there (often reported as the
    capture's own failure, the out-of-memory error its context) is ``torch.OutOfMemoryError``, so that a
    caller that lowers the batch on OOM (``bench --oom_fallback``, table2) does so; anything else as is."""
    for cause in (err, err.__context__, err.__cause__):
        if isinstance(cause, torch.OutOfMemoryError) or (cause is not None and "out of memory" in str(cause)):
            return torch.OutOfMemoryError(f"out of memory while capturing the training step as a CUDA graph: {cause}")
    return err


class GraphedTrainStep:
    """One optimizer step over at most ``accum_iter`` micro-batches per call, as ``train_step`` computes it
    (no GradScaler), replayed from CUDA graphs after ``warmup_steps`` eager steps.

    One micro-batch per step in one process: a single graph of forward, backward and update, with the
    gradients set to None before the capture so that backward writes them (nothing to zero, nothing to
    add). Several micro-batches, or several processes: the gradients are a ``FlatGradients`` buffer; a
    graph of forward and backward, which adds into it, is replayed per micro-batch; then the buffer is
    averaged across the ranks (several processes); then a graph of the update zeroes it.

    ``process_group``: the ranks whose gradients are averaged (``model`` is not wrapped in DDP); None in
    one process. ``runner``: the CUDA side (a ``CudaGraphRunner`` for the model's device); tests pass
    one that runs the captured bodies eagerly.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, mask_ratio: float,
                 autocast_dtype: torch.dtype | None, accum_iter: int = 1, warmup_steps: int = DEFAULT_WARMUP_STEPS,
                 runner: CudaGraphRunner | None = None, process_group=None):
        if warmup_steps < 1:
            raise ValueError(f"a CUDA-graph step needs at least one eager warm-up step, got {warmup_steps}")
        if accum_iter < 1:
            raise ValueError(f"accum_iter must be positive, got {accum_iter}")
        self.device = next(model.parameters()).device
        self.model, self.optimizer = model, optimizer
        self.runner = runner if runner is not None else CudaGraphRunner(self.device)
        self.mask_ratio = mask_ratio
        self.autocast_dtype = autocast_dtype
        self.accum_iter = accum_iter
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.static_imgs = self.static_noise = self.static_loss = None
        # what each micro-batch's loss is multiplied by before its backward: 1 / micro-batches this step
        self.static_loss_scale = torch.ones((), device=self.device)
        self.micro_graph = self.update_graph = None
        if process_group is not None:
            broadcast_from_first_rank(model, process_group)
        self.gradients = (FlatGradients(model.parameters(), process_group)
                          if accum_iter > 1 or process_group is not None else None)
        make_optimizer_capturable(optimizer, self.device)

    @property
    def captured(self) -> bool:
        return self.micro_graph is not None

    def __call__(self, micro_batches) -> torch.Tensor:
        """micro_batches: 1 to ``accum_iter`` pairs (imgs [B, C, H, W], noise [B, L] or None: drawn here) ->
        the micro-batches' losses [len(micro_batches)], a device tensor (no sync)."""
        micro_batches = [(imgs, torch.rand(imgs.shape[0], self.model.num_patches, device=imgs.device)
                          if noise is None else noise) for imgs, noise in micro_batches]
        if not 1 <= len(micro_batches) <= self.accum_iter:
            raise ValueError(f"the CUDA-graph step takes 1 to {self.accum_iter} micro-batches per step "
                             f"(--accum_iter {self.accum_iter}), got {len(micro_batches)}")
        self.static_loss_scale.fill_(1.0 / len(micro_batches))
        self.steps += 1
        if self.steps <= self.warmup_steps:
            with self.runner.warmup(*(t for pair in micro_batches for t in pair)):
                losses = torch.stack([self._forward_backward(imgs, noise) for imgs, noise in micro_batches])
                self._reduce_and_update()
            return losses.clone()
        if not self.captured:
            self._capture(*micro_batches[0])
        losses = torch.empty(len(micro_batches), device=self.device)
        for index, (imgs, noise) in enumerate(micro_batches):
            self._check_like("the batch", imgs, self.static_imgs)
            self._check_like("the masking noise", noise, self.static_noise)
            self.static_imgs.copy_(imgs)
            self.static_noise.copy_(noise)
            self.runner.replay(self.micro_graph)
            losses[index] = self.static_loss
        if self.update_graph is not None:
            if self.gradients is not None:
                self.gradients.all_reduce()
            self.runner.replay(self.update_graph)
        return losses

    def _capture(self, imgs: torch.Tensor, noise: torch.Tensor) -> None:
        self.static_imgs, self.static_noise = imgs.clone(), noise.clone()
        if self.gradients is None:
            # backward creates the gradients inside the graph's memory: each replay overwrites them
            self.optimizer.zero_grad(set_to_none=True)

            def forward_backward_update():
                loss = self._forward_backward(self.static_imgs, self.static_noise)
                self.optimizer.step()
                return loss

            self.micro_graph, self.static_loss = self.runner.capture(forward_backward_update)
            return
        # the flat gradients exist before the captures: each micro-batch's backward adds into them in place
        self.micro_graph, self.static_loss = self.runner.capture(
            lambda: self._forward_backward(self.static_imgs, self.static_noise))
        self.update_graph, _ = self.runner.capture(self._update)

    def _forward_backward(self, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        # no autocast cache: a cast weight cached across the capture would outlive its graph memory
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            loss, _, _ = self.model(imgs, self.mask_ratio, noise=noise, full_pred=False)
        (loss * self.static_loss_scale).backward()  # the gradient of the micro-batches' mean loss
        return loss.detach()

    def _reduce_and_update(self) -> None:
        if self.gradients is not None:
            self.gradients.all_reduce()
        self._update()

    def _update(self) -> None:
        self.optimizer.step()
        if self.gradients is None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.gradients.zero_()

    @staticmethod
    def _check_like(what: str, tensor: torch.Tensor, static: torch.Tensor) -> None:
        if tensor.shape != static.shape or tensor.dtype != static.dtype or tensor.device != static.device:
            raise ValueError(
                f"the CUDA-graph step was captured for {what} of shape {list(static.shape)}, {static.dtype} on "
                f"{static.device}; got {list(tensor.shape)}, {tensor.dtype} on {tensor.device}. A replay repeats "
                f"the captured shapes: every batch must be full (the loaders drop the last partial batch)")
