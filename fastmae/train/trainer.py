"""The pretraining loop: micro-batches -> AdamW steps, with logging, checkpoints and clean stops.

The loop never waits for the accelerator except on logging steps and checkpoint saves: the loss
and a "non-finite seen" flag are accumulated as device tensors and read back there. Every random
choice is keyed by (seed, step, rank) (masking noise) or (seed, epoch, position) (augmentation), so
a run stopped and resumed from a checkpoint computes exactly what the uninterrupted run computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from fastmae.checkpoint import UnreadableCheckpoint, check_resume_file
from fastmae.compiling import CompileConfig, compile_for_training, mark_step_begin
from fastmae.data.loader import DataConfig, UnreadableData, build_loader, preview_batch, resolve_loader
from fastmae.kernels import resolve_kernels
from fastmae.masking import num_visible_patches
from fastmae.models import create_model
from fastmae.train.checkpoints import (
    TrainingPosition, UnloggedSums, earlier_run_outputs, keep_as_epoch_checkpoint, latest_checkpoint, resume_from,
    save_training_checkpoint, set_aside_checkpoints_redone, step_checkpoint_path, step_checkpoints,
)
from fastmae.train.config import PretrainConfig, default_num_workers
from fastmae.train.cuda_graph import GraphedTrainStep, use_cuda_graph
from fastmae.train.distributed import DistributedContext
from fastmae.train.metrics import (
    MetricsLogger, RunTotals, no_tensorboard_message, peak_memory_gb, plot_loss_curve, set_aside_earlier_outputs,
    set_aside_lines_redone,
)
from fastmae.train.optim import build_optimizer
from fastmae.train.output_lock import OutputFolderInUse, OutputFolderLock, in_use_message
from fastmae.train.schedule import base_batch_lr, lr_at, set_lr

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXIT_NONFINITE = 3
EXIT_NOT_SAVED = 4
EXIT_OUT_OF_MEMORY = 5
EXIT_BAD_DATA = 2  # as for other bad input


class NonFiniteLoss(RuntimeError):
    pass


class CheckpointNotSaved(RuntimeError):
    pass


def resolve_precision(precision: str | None, device: torch.device) -> str:
    return precision or ("bf16" if device.type == "cuda" else "fp32")


def mask_noise_seed(seed: int, step: int, micro_batch: int, rank: int) -> int:
    """The masking noise's seed for one micro-batch: independent of anything that ran before."""
    return int(np.random.SeedSequence([seed, step, micro_batch, rank]).generate_state(1, np.uint64)[0] >> 1)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               micro_batches, mask_ratio: float, autocast_dtype: torch.dtype | None,
               compiled: CompileConfig | None = None) -> torch.Tensor:
    """One optimizer step over ``micro_batches``, an iterable of (imgs [B,3,S,S], noise [B,L]).

    Gradients are accumulated (DDP all-reduces only on the last micro-batch) and averaged over the
    micro-batches. Returns the detached per-micro-batch losses [M] as a device tensor (no sync).
    ``compiled``: how ``model`` was compiled (CUDA-graph replays need each iteration marked).
    """
    micro_batches = list(micro_batches)
    device = micro_batches[0][0].device
    # copied out of the forward's output: a CUDA-graph replay reuses that memory
    losses = torch.empty(len(micro_batches), device=device)
    with _one_autocast_cache(device, autocast_dtype is not None and compiled is None and len(micro_batches) > 1):
        for index, (imgs, noise) in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            mark_step_begin(compiled)
            with contextlib.nullcontext() if last else _no_sync(model):
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    loss, _, _ = model(imgs, mask_ratio, noise=noise, full_pred=False)
                losses[index] = loss.detach()
                scaler.scale(loss / len(micro_batches)).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return losses


def _one_autocast_cache(device: torch.device, enabled: bool):
    """Around the micro-batches of one step: autocast casts each weight once a step instead of once
    per micro-batch (ViT-L: 262 cast kernels and about 2 GB of memory traffic per micro-batch). The
    weights change only at the optimizer step, so the cast values are the same; the cast copies stay
    alive for the step (2 bytes a parameter). Autocast empties its cache when its outermost context
    exits: this disabled context is the outermost one, and the backward passes still run outside
    autocast. Eager only: a compiled graph casts inside itself."""
    return torch.autocast(device.type, enabled=False) if enabled else contextlib.nullcontext()


def _no_sync(model: nn.Module):
    """DDP's no_sync (skip the gradient all-reduce of this backward), through a torch.compile wrapper."""
    ddp = getattr(model, "_orig_mod", model)
    return ddp.no_sync() if isinstance(ddp, DistributedDataParallel) else contextlib.nullcontext()


class Pretrainer:
    def __init__(self, cfg: PretrainConfig, ctx: DistributedContext, args_to_save=None):
        self.cfg, self.ctx = cfg, ctx
        self.device = ctx.device
        self.output_dir = Path(cfg.output_dir)
        self.args_to_save = args_to_save if args_to_save is not None else asdict(cfg)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.autocast_dtype = None if self.precision == "fp32" else AUTOCAST_DTYPES[self.precision]
        replay_step = use_cuda_graph(cfg.cuda_graph, self.device, self.precision, cfg.compile_config(), cfg.attn,
                                     ctx.world_size)
        resolve_kernels(cfg.kernels, self.device)  # --kernels triton on a CPU: said now, not at the first step

        # Nothing an earlier run wrote is replaced unasked (a relaunch that forgot --resume would
        # otherwise rotate away days of checkpoints). Every rank stops: rank 0 alone may see the files.
        earlier = earlier_run_outputs(self.output_dir, cfg.resume) if ctx.is_main else []
        if ctx.any_rank(bool(earlier)):
            # the same job launched twice: the files are a live run's, and waiting is the fix
            holder = OutputFolderLock.holder(self.output_dir) if ctx.is_main else None
            raise ValueError(in_use_message(self.output_dir, holder) if holder else self._earlier_run_message(earlier))

        # data first: a bad --data_path is an error before any model is built
        self.data_cfg = DataConfig(
            data_path=cfg.data_path, input_size=cfg.input_size, batch_size=cfg.batch_size,
            num_workers=self._num_workers(), pin_mem=cfg.pin_mem, seed=cfg.seed, loader=cfg.data_loader,
            samples_per_epoch=cfg.samples_per_epoch,
        )
        self.data = build_loader(self.data_cfg, ctx.rank, ctx.world_size, self.device)
        self.batches_per_epoch = len(self.data)
        # as engine_pretrain.py: the optimizer steps after every accum_iter batches, and the batches left
        # at the end of an epoch make no step (the reference zeroes their gradients at the next epoch)
        self.steps_per_epoch = self.batches_per_epoch // cfg.accum_iter
        self.stepped_batches = self.steps_per_epoch * cfg.accum_iter  # an epoch's batches that make steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"an epoch has {self.batches_per_epoch} batch(es) of {cfg.batch_size} per rank, fewer than "
                             f"--accum_iter {cfg.accum_iter}: no optimizer step would be taken; lower --accum_iter or "
                             "--batch_size")

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = create_model(cfg.model, img_size=cfg.input_size, norm_pix_loss=cfg.norm_pix_loss,
                                  kernels=cfg.kernels, attn=cfg.attn).to(self.device)
        self._check_mask_ratio()
        self.effective_batch = cfg.batch_size * cfg.accum_iter * ctx.world_size
        self.peak_lr = cfg.lr if cfg.lr is not None else base_batch_lr(cfg.blr, self.effective_batch)
        self.optimizer = build_optimizer(self.model, self.peak_lr, cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.images_per_batch = cfg.batch_size * ctx.world_size
        self.position = TrainingPosition(epoch=cfg.start_epoch, images_per_batch=self.images_per_batch)
        self.last_checkpoint: Path | None = None
        self.messages: list[str] = []
        self._resume()

        self.train_model: nn.Module = self.model
        # with --cuda_graph the graphed step averages the gradients itself (DDP's hooks are not captured)
        if ctx.enabled and not replay_step:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids, gradient_as_bucket_view=True)
        self.compiled = cfg.compile_config()
        if self.compiled is not None:
            if self.compiled.uses_cuda_graphs and ctx.enabled:
                # DDP's gradient hooks around CUDA-graph replays are not verified here (see PretrainConfig)
                raise ValueError(f"--compile_mode {self.compiled.mode} (CUDA graphs) runs in one process only; "
                                 f"with DDP use --compile_mode max-autotune-no-cudagraphs or default")
            self.train_model = compile_for_training(self.train_model, self.model, self.compiled)
        # after the resume: the optimizer it loaded is made capturable
        self.graphed_step = GraphedTrainStep(
            self.model, self.optimizer, cfg.mask_ratio, self.autocast_dtype, cfg.accum_iter,
            process_group=torch.distributed.group.WORLD if ctx.enabled else None) if replay_step else None
        self.noise_generator = torch.Generator(device=self.device)

        # the step count at the end: what is done, plus the rest of this epoch and the epochs after it
        remaining = self.steps_per_epoch * (cfg.epochs - self.position.epoch) - self.position.batch // cfg.accum_iter
        end = self.position.step + max(remaining, 0)
        self.total_steps = min(end, cfg.max_steps) if cfg.max_steps else end
        # the first write: from here on no other run may write the folder (after every check above, so a
        # refused run leaves nothing behind)
        self.output_lock, refused = None, None
        if ctx.is_main:
            try:
                self.output_lock = OutputFolderLock.acquire(self.output_dir)
            except OutputFolderInUse as err:
                refused = str(err)
            except OSError as err:  # a full disk, a quota, a read-only mount
                refused = f"--output_dir {self.output_dir}: nothing can be written there: {err}"
        if ctx.any_rank(refused is not None):
            raise ValueError(refused or "--output_dir is in use or cannot be written (seen by the first rank)")
        if ctx.is_main and self.last_checkpoint is None:
            self.messages.extend(set_aside_earlier_outputs(self.output_dir))
        elif ctx.is_main:
            self.messages.extend(set_aside_lines_redone(self.output_dir, self.position.step, self.position.epoch))
            self.messages.extend(set_aside_checkpoints_redone(self.output_dir, self.position.step, self.position.epoch))
        self.logger = MetricsLogger(self.output_dir, cfg.log_dir or self.output_dir, self.total_steps,
                                    self.position.step, enabled=ctx.is_main, progress_bar=cfg.progress_bar,
                                    append=self.last_checkpoint is not None)
        if cfg.log_dir is not None and ctx.is_main and self.logger.writer is None:
            self.messages.append(no_tensorboard_message(cfg.log_dir, self.logger.path))
        if ctx.is_main:
            self.messages.extend(self._disk_space_warnings())
        self._stop_signal: int | None = None
        self._periodic_save_tried: int | None = None  # the step of the last periodic save tried
        self._flops_per_image, self._peak_flops = self._flop_rates()
        self.first_loss = self.last_loss = None
        self.start_step = self.position.step  # after a resume, where this process's run begins
        self.totals = RunTotals()  # its logged windows

    # ---- set-up ----

    def _num_workers(self) -> int:
        if self.cfg.num_workers is not None:
            return self.cfg.num_workers
        return default_num_workers(self.ctx.ranks_on_this_machine())

    def _check_mask_ratio(self) -> None:
        """Both visible and removed patches, said now rather than at the first step (the encoder needs
        one visible patch, the loss averages over the removed ones)."""
        L = self.model.num_patches
        try:
            visible = num_visible_patches(L, self.cfg.mask_ratio)
        except ValueError as err:
            raise ValueError(f"--mask_ratio {self.cfg.mask_ratio}: {err}") from None
        if visible == L:
            raise ValueError(f"--mask_ratio {self.cfg.mask_ratio} removes none of the {L} patches of an image: "
                             "the loss would have nothing to average")

    def _disk_space_warnings(self) -> list[str]:
        """A disk without room for one checkpoint is said at the start, not at the first save hours later."""
        weights = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        adam_moments = 2 * sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        needed, free = weights + adam_moments, shutil.disk_usage(self.output_dir).free
        if free >= needed:
            return []
        return [f"the disk holding --output_dir {self.output_dir} has {free / 2**20:.0f} MiB free, and a checkpoint "
                f"of this run takes about {needed / 2**20:.0f} MiB: the checkpoints will fail until there is room"]

    def _earlier_run_message(self, earlier: list[Path]) -> str:
        if not earlier:  # another rank's view
            return f"--output_dir {self.output_dir} holds an earlier run's files (rank 0 names them)"
        names = ", ".join(p.name for p in earlier[-3:]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
        if self.cfg.resume:
            return (f"--output_dir {self.output_dir} holds another run's checkpoints ({names}); resuming from "
                    f"{self.cfg.resume} there would mix the two runs' checkpoints: give another --output_dir "
                    "(or move those files away)")
        if all(p.name == "metrics.jsonl" for p in earlier):
            return (f"--output_dir {self.output_dir} holds an earlier run's metrics.jsonl, and no checkpoint of it to "
                    "continue: give another --output_dir, or --resume auto to start afresh there (the earlier run's "
                    "metrics.jsonl and log.txt are then kept as metrics.restarted.jsonl and log.restarted.txt)")
        return (f"--output_dir {self.output_dir} holds an earlier run ({names}), which a fresh run would replace: "
                "continue it with --resume auto, or give another --output_dir (or move those files away)")

    def _resume(self) -> None:
        cfg = self.cfg
        if not cfg.resume:
            return
        # the first rank picks the checkpoint and every rank loads that one: a folder on each node's own disk
        # would otherwise have the ranks continue from different steps (and hang at the first collective
        # where their step counts part)
        path = self.ctx.from_first_rank(latest_checkpoint(self.output_dir) if self.ctx.is_main else None) \
            if cfg.resume == "auto" else Path(cfg.resume)
        if path is None:
            self.messages.append(f"--resume auto: no checkpoint in {self.output_dir}, starting from scratch")
            return
        here = path.is_file()
        if self.ctx.any_rank(not here) and self.ctx.any_rank(here):
            this_one = "this one does" if here else "this one does not"
            raise ValueError(f"--resume {path}: not every process of the run sees this file ({this_one}): give "
                             "--output_dir (and --resume) a folder every node shares")
        check_resume_file(path)
        try:
            position, message = resume_from(path, self.model, self.optimizer, self.scaler, asdict(cfg),
                                            steps_per_epoch=self.steps_per_epoch)
        except UnreadableCheckpoint as err:
            earlier = step_checkpoints(self.output_dir)[:-1] if cfg.resume == "auto" else []
            if not earlier:
                raise
            # a newest checkpoint copied in part, or damaged: the one before it is the way on
            raise ValueError(f"{err}\n--resume auto took the newest checkpoint; the one before it is {earlier[-1]}: "
                             f"give --resume {earlier[-1]}, or move {path.name} out of {self.output_dir}") from err
        self.messages.append(message)
        if position is not None:
            saved_at = (position.epoch, position.batch)
            self._convert_data_position(position)
            if position.batch > self.batches_per_epoch:
                raise ValueError(f"{path} stopped at batch {position.batch} of an epoch, but an epoch now has "
                                 f"{self.batches_per_epoch} batches: resume with the same data and batch size")
            if position.batch >= self.stepped_batches:
                # a run with a smaller --accum_iter, or an earlier fastmae (which stepped on an epoch's left-over
                # batches), stopped there: the epoch's steps are done (its log.txt line was that run's to write)
                self.messages.append(
                    f"{path.name} stopped at batch {position.batch} of epoch {position.epoch}, after its last whole "
                    f"step of --accum_iter {self.cfg.accum_iter} (the {self.batches_per_epoch - position.batch} "
                    f"left-over batch(es) make no step): continuing at epoch {position.epoch + 1}")
                position.epoch, position.batch = position.epoch + 1, 0
            if (position.epoch, position.batch) != saved_at:
                # the losses the checkpoint carried are of steps before another place: its window's and epoch's
                # lines would count steps twice, or another epoch's
                position.unlogged = None
            self.position = position
            self.last_checkpoint = path

    def _convert_data_position(self, position: TrainingPosition) -> None:
        """A checkpoint of a run with another batch size or world size: continue after the same number
        of images of the epoch (exact resumption needs both unchanged). One of a run with another
        --accum_iter, stopped between two of this run's steps: continue at the step boundary before it."""
        saved, now = position.images_per_batch or self.images_per_batch, self.images_per_batch
        accum = self.cfg.accum_iter
        if saved != now and position.batch:
            batch = position.batch * saved // now
            batch -= batch % accum  # start on an optimizer-step boundary
            # not among the epoch's left-over batches, which make no step: the epoch's last step is taken here
            batch = min(batch, self.stepped_batches - accum)
            self.messages.append(
                f"the checkpoint's micro-batches held {saved} images over all ranks, this run's hold {now}: "
                f"continuing at batch {batch} of epoch {position.epoch} (the same images seen, but the data "
                f"order now differs from an uninterrupted run)")
            position.batch = batch
        elif position.batch % accum and position.batch < self.stepped_batches:
            # an epoch's steps end at stepped_batches: a start between boundaries would read past its end
            batch = position.batch - position.batch % accum
            self.messages.append(
                f"the checkpoint stopped at batch {position.batch} of epoch {position.epoch}, between two steps of "
                f"--accum_iter {accum}: continuing at batch {batch}, the step boundary before it (batch(es) "
                f"{batch} to {position.batch - 1} are seen again)")
            position.batch = batch
        position.images_per_batch = now

    def _flop_rates(self) -> tuple[float | None, float | None]:
        """Training FLOPs per image and the device's peak FLOP/s, for MFU (CUDA only)."""
        if self.device.type != "cuda":
            return None, None
        try:
            from fastmae.flops import device_peak_flops, train_flops_per_image
        except ImportError:
            return None, None
        dtype = self.autocast_dtype or torch.float32
        tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
        peak = device_peak_flops(torch.cuda.get_device_name(self.device), dtype, tf32=tf32)
        return train_flops_per_image(self.model.config, self.cfg.mask_ratio), peak

    def describe(self) -> str:
        cfg, ctx = self.cfg, self.ctx
        params = sum(p.numel() for p in self.model.parameters() if p.requires_grad) / 1e6
        data = cfg.data_path or "the embedded skimage.data photographs"
        return "\n".join([
            f"model {cfg.model}: {params:.1f}M trainable parameters, {cfg.input_size}px, mask ratio {cfg.mask_ratio}",
            f"data {data}: {self.batches_per_epoch} batches of {cfg.batch_size} per epoch per rank "
            f"({type(self.data).__name__}, {self.data_cfg.num_workers} worker(s)), {cfg.epochs} epochs",
            f"device {self.device} x {ctx.world_size} rank(s), {self.precision}, kernels {cfg.kernels}, attention {cfg.attn}"
            + (f", {self.compiled.describe()}" if self.compiled else "")
            + (", the step replayed as a CUDA graph" if self.graphed_step else "")
            + (" (--cuda_graph off: eager)" if self.graphed_step and cfg.cuda_graph == "auto" else "")
            + (f", {torch.get_num_threads()} CPU thread(s)" if self.device.type == "cpu" else ""),
            f"effective batch {self.effective_batch} = {cfg.batch_size} x accum {cfg.accum_iter} x {ctx.world_size}; "
            f"peak lr {self.peak_lr:.3g} ({self._lr_origin()}), warm-up {cfg.warmup_epochs} epochs, cosine to {cfg.min_lr:g}",
            f"{self.total_steps} optimizer steps in total, starting at step {self.position.step}; output in {self.output_dir}",
        ])

    def _lr_origin(self) -> str:
        """Where the peak lr comes from; for --lr, the base lr it implies, as the reference prints."""
        if self.cfg.lr is None:
            return f"blr {self.cfg.blr:g} x effective batch / 256"
        return f"--lr, which is blr {self.cfg.lr * 256 / self.effective_batch:.3g} at this effective batch"

    # ---- the loop ----

    def fit(self) -> int:
        """Train; returns the process exit status (0 done, 3 non-finite loss, 4 the last checkpoint could
        not be written, 5 out of device memory, 128+N on signal N)."""
        for message in self.messages:
            self.logger.message(message)
        self.logger.message(self.describe())
        if self._finished():  # resumed at or past the end of this run's schedule
            limit = (f"--epochs {self.cfg.epochs}" if self.position.epoch >= self.cfg.epochs
                     else f"--max_steps {self.cfg.max_steps}")
            self.logger.message(f"nothing to train: the run is at step {self.position.step}, epoch "
                                f"{self.position.epoch}, already at the end that {limit} sets (raise it to go on)")
        previous = self._install_signal_handlers()
        try:
            status = self._train()
        except NonFiniteLoss as err:
            self.logger.message(str(err))
            status = EXIT_NONFINITE
        except CheckpointNotSaved as err:
            self.logger.message(str(err))
            status = EXIT_NOT_SAVED
        except torch.OutOfMemoryError as err:
            if self.ctx.enabled:
                # one rank's failure: the others wait in this step's collectives, so this process must end
                # (torchrun then stops them), on whichever rank it is
                print(self._out_of_memory_message(err), file=sys.stderr, flush=True)
                raise
            self.logger.message(self._out_of_memory_message(err))
            status = EXIT_OUT_OF_MEMORY
        except UnreadableData as err:
            message = f"fastmae pretrain: error: {err} (stopped at step {self.position.step}; {self._saved_so_far()})"
            print(message, file=sys.stderr, flush=True)
            if self.ctx.enabled:  # as for out of memory: the other ranks wait in this step's collectives
                raise
            status = EXIT_BAD_DATA
        try:  # however the run ended, its summary replaces an earlier process's, unless it timed nothing
            summary = self.output_dir / "summary.json"
            if self.ctx.is_main and self.totals.whole.summary()["img_per_s"] is None and summary.is_file():
                self.logger.message(f"{self.totals.describe()}: {summary} of the earlier process kept")
            elif self.ctx.is_main:
                self.logger.message(f"{self.totals.describe()}: {self._written(self.write_summary, summary)}")
            # the processes leave together: none tears down its end of the group while the first still uses it
            # (writing the figures). Under this run's signal handlers still: a job's SIGTERM arriving now (a
            # time limit just after the last step) is noted, where it ended a waiting process mid-barrier
            self.ctx.barrier()
        finally:
            self._restore_signal_handlers(previous)
            self.logger.close()
            if self.output_lock is not None:
                self.output_lock.release()
        return status

    def _finished(self) -> bool:
        return self.position.epoch >= self.cfg.epochs or (
            self.cfg.max_steps is not None and self.position.step >= self.cfg.max_steps)

    def _train(self) -> int:
        cfg, pos = self.cfg, self.position
        window = _LogWindow(self.device, time.perf_counter(), pos.step)
        epoch_sums = _EpochSums(self.device)
        if pos.unlogged is not None:  # the steps before the resume that no line holds yet
            window.carry_over(pos.unlogged, self.ctx.is_main)
            epoch_sums.carry_over(pos.unlogged, self.ctx.is_main)
        while not self._finished():
            epoch, n, stepped = pos.epoch, self.batches_per_epoch, self.stepped_batches
            self.data.set_epoch(epoch, pos.batch)
            batches = iter(self.data)
            while pos.epoch == epoch and not self._finished():
                if self.ctx.any_rank(self._stop_signal is not None):
                    return self._stop_on_signal(window, epoch_sums)
                start, stop = pos.batch, pos.batch + cfg.accum_iter
                lr = self._lr_at(epoch + start / n)
                set_lr(self.optimizer, lr)
                micro_batches = []
                for micro in range(stop - start):
                    t0 = time.perf_counter()
                    imgs = next(batches)  # [B, 3, S, S] normalised, on the device
                    window.data_wait += time.perf_counter() - t0
                    micro_batches.append((imgs, self._mask_noise(pos.step, micro, imgs.shape[0])))
                if self.graphed_step is not None:
                    losses = self.graphed_step(micro_batches)
                else:
                    losses = train_step(self.train_model, self.optimizer, self.scaler, micro_batches,
                                        cfg.mask_ratio, self.autocast_dtype, self.compiled)
                window.add(losses, sum(imgs.shape[0] for imgs, _ in micro_batches))
                epoch_sums.add(losses, lr)
                pos.step += 1
                pos.epoch, pos.batch = (epoch + 1, 0) if stop == stepped else (epoch, stop)
                self.logger.advance()
                if stop == stepped:
                    # read, so that the loader ends its epoch as it began it
                    left_over = [next(batches) for _ in range(n - stepped)]
                    if left_over:
                        epoch_sums.add(self._left_over_losses(left_over, pos.step - 1), self._lr_at(epoch + stepped / n))
                    self._end_epoch(epoch, epoch_sums, window)  # may save a checkpoint: after the step count
                last = self._finished()
                if pos.step % cfg.log_every == 0 or last:
                    self._log(window)
                if pos.step % cfg.save_every == 0 and not last:
                    self._save(window, epoch_sums, periodic=True)
        self._save(window, epoch_sums)
        self._finish()
        return 0

    def _end_epoch(self, epoch: int, sums: "_EpochSums", window: "_LogWindow") -> None:
        """The reference's log.txt line of the epoch just done: its loss and lr averaged over its
        iterations (micro-batches) on all ranks, as main_pretrain.py's metric logger does. An epoch this
        process began part-way starts from the sums its checkpoint carried: the whole epoch's average.
        (A checkpoint of an earlier fastmae carries none: then the steps after the resume.)"""
        loss, lr = sums.reduce(self.ctx)
        if not math.isfinite(loss):  # the same on every rank: all stop
            raise NonFiniteLoss(self._nonfinite_message(window.first_step, self.position.step))
        self.logger.log_epoch({"train_lr": lr, "train_loss": loss, "epoch": epoch})
        every = self.cfg.save_epochs
        if every and (epoch % every == 0 or epoch + 1 == self.cfg.epochs):
            self._save_epoch_checkpoint(epoch, window, sums)

    def _save_epoch_checkpoint(self, epoch: int, window: "_LogWindow", sums: "_EpochSums") -> None:
        """The reference's checkpoint-{epoch}.pth, for the scripts that look for it: the step checkpoint of
        this step (so --resume auto, which reads step checkpoints, is never behind it), kept under that
        name too. A file system that refuses it is said, and training goes on."""
        path = self._save(window, sums, periodic=True)
        if not self.ctx.is_main or path != step_checkpoint_path(self.output_dir, self.position.step):
            return  # not saved: _save said why
        try:
            kept = keep_as_epoch_checkpoint(path, epoch)
        except OSError as err:
            self.logger.message(f"could not keep {path.name} as checkpoint-{epoch}.pth: {err}; training goes on")
            return
        self.logger.message(f"epoch {epoch} done: {kept}")

    def _lr_at(self, epochs_done: float) -> float:
        """The schedule's lr after ``epochs_done`` epochs (a fraction within one), as the reference sets it."""
        cfg = self.cfg
        return lr_at(epochs_done, self.peak_lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)

    def _left_over_losses(self, batches: list[torch.Tensor], step: int) -> torch.Tensor:
        """The losses [M] of an epoch's left-over batches (fewer than --accum_iter), for its log.txt averages
        alone: main_pretrain.py runs them forward and backward, logs their loss and the lr of the step they
        would have begun, and zeroes their gradients when the next epoch starts. Here a forward without
        gradients, eager (a compiled model would compile again for it), its noise keyed after the step's
        micro-batches. Nothing is read back."""
        losses = torch.empty(len(batches), device=self.device)
        with torch.no_grad(), torch.compiler.set_stance("force_eager"), \
                torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                               enabled=self.autocast_dtype is not None):
            for index, imgs in enumerate(batches):
                noise = self._mask_noise(step, self.cfg.accum_iter + index, imgs.shape[0])
                losses[index] = self.model(imgs, self.cfg.mask_ratio, noise=noise, full_pred=False)[0]
        return losses

    def _mask_noise(self, step: int, micro: int, batch: int) -> torch.Tensor:
        """Masking noise [B, L] keyed by (seed, step, micro-batch, rank), drawn on the device."""
        self.noise_generator.manual_seed(mask_noise_seed(self.cfg.seed, step, micro, self.ctx.rank))
        return torch.rand(batch, self.model.num_patches, generator=self.noise_generator, device=self.device)

    def _log(self, window: "_LogWindow") -> None:
        """A logging step: the one place the loop reads device values back."""
        pos = self.position
        loss_sum, count, nonfinite, skipped = window.reduce(self.ctx, self.data.skipped)
        now = time.perf_counter()
        elapsed = max(now - window.started, 1e-9)
        if nonfinite:
            raise NonFiniteLoss(self._nonfinite_message(window.first_step, pos.step))
        loss = loss_sum / max(count, 1)
        img_per_s = window.images * self.ctx.world_size / elapsed
        record = {
            "step": pos.step,
            "epoch": round(pos.epoch + pos.batch / self.batches_per_epoch, 4),
            "loss": loss,
            "lr": float(self.optimizer.param_groups[0]["lr"]),  # a tensor under --cuda_graph
            "img_per_s": img_per_s,
            "data_wait": window.data_wait / elapsed,
            "peak_mem_gb": peak_memory_gb(self.device),
            "skipped_images": skipped,
        }
        if self._flops_per_image and self._peak_flops:
            record["mfu"] = self._flops_per_image * img_per_s / self.ctx.world_size / self._peak_flops
        if skipped > window.skipped_reported:
            self.logger.message(f"skipped {skipped} unreadable image(s) so far (each replaced by the next image)")
            window.skipped_reported = skipped
        self.logger.log(record)
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss
        self._count_in_totals(window, elapsed)
        window.restart(now, pos.step)

    def _count_in_totals(self, window: "_LogWindow", seconds: float) -> None:
        """The window's steps, images (all ranks), time and wait for data, added to the run's totals."""
        self.totals.add_window(seconds, window.data_wait, window.images * self.ctx.world_size,
                               self.position.step - window.first_step)

    def _save(self, window: "_LogWindow", epoch_sums: "_EpochSums", periodic: bool = False) -> Path | None:
        """Save a checkpoint of the current state, after checking that no loss since the last check
        was non-finite (a non-finite state is never saved as "good").

        A file system that refuses the write (full, over quota, gone) leaves the earlier checkpoints
        as they were. A ``periodic`` save then says so and training goes on, to try again at the next
        one: stopping would lose every step since the last checkpoint. Any other save (the end of the
        run, a signal) raises CheckpointNotSaved."""
        step = self.position.step
        if self.last_checkpoint is not None and self.last_checkpoint.name.endswith(f"{step:08d}.pth"):
            return self.last_checkpoint  # this step is saved already (e.g. resumed with nothing to do)
        if periodic and self._periodic_save_tried == step:
            return self.last_checkpoint  # the epoch's checkpoint of this step was refused just now: not again
        self._periodic_save_tried = step if periodic else None
        window_loss, window_count, nonfinite, _ = window.reduce(self.ctx, self.data.skipped)
        if nonfinite:
            raise NonFiniteLoss(self._nonfinite_message(window.first_step, step))
        if step % self.cfg.log_every == 0 or self._finished():  # this step's line takes the window
            window_loss, window_count = 0.0, 0
        epoch_loss, epoch_count = epoch_sums.totals(self.ctx)
        unlogged = UnloggedSums(window_loss, window_count, epoch_loss, epoch_count, epoch_sums.lr_sum,
                                epoch_sums.iterations)
        path, error = step_checkpoint_path(self.output_dir, step), None
        if self.ctx.is_main:
            try:
                save_training_checkpoint(self.output_dir, self.model, self.optimizer, self.scaler,
                                         dataclasses.replace(self.position, unlogged=unlogged), self.args_to_save,
                                         self.cfg.keep_checkpoints)
            except OSError as err:
                error = err
        # also the barrier: the file is complete (or failed) before any rank moves on (or exits)
        if self.ctx.any_rank(error is not None):
            message = (f"could not save the checkpoint of step {step} as {path}: {error or 'failed on the first rank'}; "
                       f"{self._saved_so_far()}")
            if not periodic:
                raise CheckpointNotSaved(message)
            self.logger.message(f"{message}; {self._next_save_said()}")
            return self.last_checkpoint
        self.last_checkpoint = path
        return path

    def _next_save_said(self) -> str:
        """After a refused periodic save: when the next try is (an epoch's checkpoint may come sooner)."""
        if self._finished():
            return "it is tried once more now, as the run's last checkpoint"
        pos, cfg = self.position, self.cfg
        step = (pos.step // cfg.save_every + 1) * cfg.save_every
        if cfg.save_epochs:  # the next epoch checkpoint: at the end of the next epoch that saves one
            epoch = next(e for e in range(pos.epoch, cfg.epochs) if e % cfg.save_epochs == 0 or e + 1 == cfg.epochs)
            epoch_end = (pos.step + (self.stepped_batches - pos.batch) // cfg.accum_iter
                         + (epoch - pos.epoch) * self.steps_per_epoch)
            step = min(step, epoch_end)
        if step >= self.total_steps:
            return f"training goes on and tries again at its end (step {self.total_steps})"
        return f"training goes on and tries again at step {step}"

    def _saved_so_far(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint of this run is saved yet"
        return f"the last checkpoint saved is {self.last_checkpoint}"

    def _out_of_memory_message(self, error: torch.OutOfMemoryError) -> str:
        resume = " (continue from it with --resume auto)" if self.last_checkpoint is not None else ""
        # the replayed step keeps its own memory pool beside the allocator's: eager needs a little less
        graph = "; or run the step eagerly with --cuda_graph off" if self.graphed_step is not None else ""
        return (f"stopping: out of {self.device.type} memory in optimizer step {self.position.step + 1} with "
                f"--batch_size {self.cfg.batch_size} per rank ({str(error).splitlines()[0]}). Lower --batch_size and "
                f"raise --accum_iter by the same factor: the effective batch ({self.effective_batch}), and with it "
                f"the learning rate, stays the same{graph}; {self._saved_so_far()}{resume}")

    def _nonfinite_message(self, first_step: int, step: int) -> str:
        where = f"between optimizer steps {first_step + 1} and {step}"
        if self.last_checkpoint is None:
            good = "no checkpoint was saved before it"
        else:
            good = f"the last good checkpoint is {self.last_checkpoint} (resume with --resume {self.last_checkpoint}, e.g. with a lower --blr)"
        return f"stopping: the loss became non-finite {where}; {good}"

    def _stop_on_signal(self, window: "_LogWindow", epoch_sums: "_EpochSums") -> int:
        signum = self._stop_signal or signal.SIGTERM
        path = self._save(window, epoch_sums)
        # the steps since the last logging step, which no line holds (the checkpoint carries their losses),
        # count in the run's totals all the same
        self._count_in_totals(window, time.perf_counter() - window.started)
        self.logger.close_bar()
        self.logger.message(f"received {signal.Signals(signum).name}: saved {path} at step {self.position.step}; "
                            f"continue with --resume auto (or --resume {path})")
        return 128 + int(signum)

    def _finish(self) -> None:
        if not self.ctx.is_main:
            return
        self.logger.close_bar()
        self.logger.message(f"done at step {self.position.step}: checkpoint {self.last_checkpoint}")
        if self.first_loss is not None:
            self.logger.message(f"loss {self.first_loss:.4f} at the first logging step, {self.last_loss:.4f} at the last")
        png = self._written(self.write_reconstructions, self.output_dir / "reconstruction.png")
        self.logger.message(f"reconstructions (masked / reconstruction + visible / original): {png}")
        loss_png = self.output_dir / "loss.png"
        try:
            curve = self._written(lambda: plot_loss_curve(self.logger.path, loss_png), loss_png)
            self.logger.message(f"loss curve: {curve}")
        except ImportError:
            self.logger.message("no loss.png: matplotlib is not installed (pip install matplotlib)")
        except ValueError as err:  # every record was refused by the disk
            self.logger.message(f"no loss.png: {err}")

    @staticmethod
    def _written(write: Callable[[], Path], path: Path) -> str:
        """``write()``'s path, or why the disk refused it: the run's checkpoint is saved by now, and a
        figure or summary the disk has no room for is said, not a traceback that hides that."""
        try:
            return str(write())
        except OSError as err:
            kept = " (the earlier one is kept)" if path.is_file() else ""
            return f"{path} could not be written{kept}: {err}"

    def write_summary(self) -> Path:
        """``summary.json``: this run's speed and time waiting for data, with the benchmarks' record of
        device, versions and commit (``benchmarks/make_results_table.py`` reads it as a training run)."""
        from fastmae.bench.environment import environment_info, write_json

        cfg = self.cfg
        whole, steady = self.totals.whole.summary(), self.totals.after_first_window.summary()
        mfu = None
        if self._flops_per_image and self._peak_flops and steady["img_per_s"]:
            mfu = self._flops_per_image * steady["img_per_s"] / self.ctx.world_size / self._peak_flops
        return write_json(self.output_dir / "summary.json", {
            "benchmark": "train",
            "environment": environment_info(self.device),
            "model": cfg.model,
            "data": cfg.data_path or "embedded photographs",
            "loader": resolve_loader(self.data_cfg, self.device),
            "images_per_epoch": self.batches_per_epoch * self.images_per_batch,
            "batch_size": cfg.batch_size,
            "accum_iter": cfg.accum_iter,
            "world_size": self.ctx.world_size,
            "dtype": self.precision,
            "kernels": cfg.kernels,
            "attn": cfg.attn,
            "compile": asdict(self.compiled) if self.compiled else None,
            "cuda_graph": self.graphed_step is not None,
            "first_step": self.start_step,
            "warmup_steps": whole["steps"] - steady["steps"],  # the first logging window
            "timed_steps": steady["steps"],
            "whole_run": whole,
            "after_first_window": steady,
            "mfu_after_first_window": mfu,
            "peak_mem_gb": peak_memory_gb(self.device),
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
        })

    def write_reconstructions(self, count: int = 8) -> Path:
        from fastmae.reconstruction import save_reconstructions

        imgs = preview_batch(self.data_cfg, count).to(self.device)  # [N, 3, S, S] normalised
        generator = torch.Generator().manual_seed(self.cfg.seed)
        noise = torch.rand(imgs.shape[0], self.model.num_patches, generator=generator).to(self.device)
        return save_reconstructions(self.model, imgs, self.output_dir / "reconstruction.png",
                                    mask_ratios=(self.cfg.mask_ratio,), noise=noise)

    # ---- signals ----

    def _install_signal_handlers(self) -> dict:
        def request_stop(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self._stop_signal = signum

        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[signum] = signal.signal(signum, request_stop)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _EpochSums:
    """An epoch's loss and lr summed over its iterations (micro-batches). The loss stays on the device
    and is read back once, at the epoch's end: no step waits for it."""

    def __init__(self, device: torch.device):
        self.device = device
        # float64: an epoch of ImageNet is thousands of iterations, whose float32 sum would drift
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_count = 0  # this rank's iterations, and on the first rank those carried over a resume
        self.lr_sum = 0.0  # the lr is a host number (lr_at), whatever the optimizer holds
        self.iterations = 0

    def carry_over(self, unlogged: UnloggedSums, first_rank: bool) -> None:
        """Start from a checkpoint's sums: the loss (all ranks') on the first rank, the lr on every rank."""
        if first_rank:
            self.loss_sum.fill_(unlogged.epoch_loss)
            self.loss_count = unlogged.epoch_count
        self.lr_sum, self.iterations = unlogged.epoch_lr, unlogged.epoch_lr_count

    def add(self, losses: torch.Tensor, lr: float) -> None:
        """losses [M]: the micro-batch losses of one optimizer step, taken at ``lr``."""
        self.loss_sum += losses.sum()
        self.loss_count += losses.numel()
        self.lr_sum += lr * losses.numel()
        self.iterations += losses.numel()

    def totals(self, ctx: DistributedContext) -> tuple[float, int]:
        """(loss sum, iterations) over all ranks so far."""
        values = torch.stack([self.loss_sum, torch.tensor(float(self.loss_count), dtype=torch.float64,
                                                          device=self.device)])
        if ctx.enabled:
            torch.distributed.all_reduce(values)
        loss_sum, count = values.tolist()
        return loss_sum, int(count)

    def reduce(self, ctx: DistributedContext) -> tuple[float, float]:
        """(mean loss over all ranks' iterations, mean lr), and start the next epoch's sums."""
        loss_sum, count = self.totals(ctx)
        lr = self.lr_sum / max(self.iterations, 1)
        self.loss_sum.zero_()
        self.loss_count, self.lr_sum, self.iterations = 0, 0.0, 0
        return loss_sum / max(count, 1), lr


class _LogWindow:
    """What accumulates between logging steps, kept on the device so no step waits for it."""

    def __init__(self, device: torch.device, started: float, step: int):
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.skipped_reported = 0
        self.restart(started, step)

    def restart(self, started: float, step: int) -> None:
        self.loss_sum.zero_()
        self.count = 0
        self.images = 0
        self.data_wait = 0.0
        self.started = started
        self.first_step = step

    def carry_over(self, unlogged: UnloggedSums, first_rank: bool) -> None:
        """Start from a checkpoint's window (all ranks' losses, on the first rank): its images and time are
        not this process's, so the speed is of the steps after the resume alone."""
        if first_rank:
            self.loss_sum.fill_(unlogged.window_loss)
            self.count = unlogged.window_count

    def add(self, losses: torch.Tensor, images: int) -> None:
        """losses [M]: the micro-batch losses of one optimizer step."""
        self.loss_sum += losses.sum()
        self.nonfinite |= ~torch.isfinite(losses).all()
        self.count += losses.numel()
        self.images += images

    def reduce(self, ctx: DistributedContext, skipped: int) -> tuple[float, int, bool, int]:
        """(loss sum, count, any non-finite, skipped images) over all ranks: one read-back."""
        values = torch.stack([self.loss_sum, torch.tensor(float(self.count), device=self.device),
                              self.nonfinite.float(), torch.tensor(float(skipped), device=self.device)])
        if ctx.enabled:
            torch.distributed.all_reduce(values)
        loss_sum, count, nonfinite, skipped_all = values.tolist()
        return loss_sum, int(count), nonfinite > 0 or not math.isfinite(loss_sum), int(skipped_all)
