"""Training checkpoints: the reference container (``fastmae.checkpoint.save_checkpoint``) plus what
an exact resume needs, under the key ``fastmae_resume``: optimizer step, data position (epoch and
next micro-batch), and the RNG states. Files are ``checkpoint-step<N>.pth`` in --output_dir, written
atomically; the newest ``keep`` are kept.

The reference ``epoch`` field holds the last *completed* epoch, so the reference code resuming one
of our files (it starts at ``epoch + 1``) repeats at most the part of an epoch we had done.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastmae.atomic_file import set_aside
from fastmae.checkpoint import load_weights, read_checkpoint, save_checkpoint, saved_args, state_dict_of
from fastmae.train.optim import load_optimizer_state

RESUME_KEY = "fastmae_resume"
# The settings that define what a run trains and on what schedule; a resume that changes one continues
# another run than the checkpoint's (sometimes meant: a longer --epochs), so it is said, not refused.
RUN_SETTINGS = ("model", "input_size", "mask_ratio", "norm_pix_loss", "data_path", "batch_size", "accum_iter",
                "epochs", "warmup_epochs", "blr", "lr", "min_lr", "weight_decay", "precision", "seed")
_STEP_FILE = re.compile(r"checkpoint-step(\d+)\.pth$")
_EPOCH_FILE = re.compile(r"^checkpoint-(\d+)\.pth$")


@dataclass
class UnloggedSums:
    """The losses of steps done but in no log line yet, over all ranks: the metrics.jsonl window's and
    the epoch's (log.txt's). A checkpoint carries them, so that a run resumed between two logging steps
    writes the lines an uninterrupted run writes, not averages of the steps after the resume alone."""
    window_loss: float = 0.0  # sum over the window's micro-batches
    window_count: int = 0
    epoch_loss: float = 0.0  # sum over the epoch's iterations (micro-batches)
    epoch_count: int = 0
    epoch_lr: float = 0.0  # sum of the lr over one rank's iterations (the same on every rank)
    epoch_lr_count: int = 0


@dataclass
class TrainingPosition:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    batch: int = 0  # index of the next micro-batch within that epoch
    images_per_batch: int = 0  # of a micro-batch over all ranks (batch_size x world size); 0 = unknown
    unlogged: UnloggedSums | None = None  # saved with a checkpoint, restored from one; None: nothing carried


def step_checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-step{step:08d}.pth"


def epoch_checkpoint_path(output_dir: str | Path, epoch: int) -> Path:
    """The reference's name: main_pretrain.py saves checkpoint-{epoch}.pth every 20 epochs and at the last."""
    return Path(output_dir) / f"checkpoint-{epoch}.pth"


def epoch_checkpoints(output_dir: str | Path) -> list[Path]:
    """The reference-named epoch checkpoints in ``output_dir``, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*.pth") if (m := _EPOCH_FILE.search(p.name))]
    return [p for _, p in sorted(found)]


def keep_as_epoch_checkpoint(step_checkpoint: Path, epoch: int) -> Path:
    """The step checkpoint saved at the end of ``epoch``, kept under the reference's name as well: a hard
    link where the file system has them (no second copy on disk, and rotating the step file away leaves
    it), else a copy; atomically, so a stop leaves no half file under the name."""
    target = epoch_checkpoint_path(step_checkpoint.parent, epoch)
    staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    staged.unlink(missing_ok=True)
    try:
        try:
            os.link(step_checkpoint, staged)
        except OSError:  # no hard links here (some network and FUSE file systems)
            shutil.copyfile(step_checkpoint, staged)
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)
    return target


def _resume_state(position: TrainingPosition) -> dict:
    state = {"step": position.step, "epoch": position.epoch, "batch": position.batch,
             "images_per_batch": position.images_per_batch, "rng": rng_states()}
    if position.unlogged is not None:
        state["unlogged"] = asdict(position.unlogged)
    return state


def step_checkpoints(output_dir: str | Path) -> list[Path]:
    """Step checkpoints in ``output_dir``, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-step*.pth") if (m := _STEP_FILE.search(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """What --resume auto continues: the newest step checkpoint (one is saved with every epoch checkpoint,
    so none is older than an epoch checkpoint of the same run), else the newest checkpoint-{epoch}.pth
    (a folder holding those alone)."""
    checkpoints = step_checkpoints(output_dir) or epoch_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def rng_states() -> dict:
    numpy_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's state as tensors and ints, so weights-only loading reads it
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_training_checkpoint(output_dir: str | Path, model, optimizer, scaler, position: TrainingPosition,
                             args, keep: int) -> Path:
    """Save ``position`` and delete the step checkpoints but the newest ``keep`` (all of them this
    run's: ``earlier_run_outputs`` keeps a run out of a folder holding another's)."""
    path = step_checkpoint_path(output_dir, position.step)
    save_checkpoint(path, model, optimizer, epoch=position.epoch - 1, scaler=scaler, args=args,
                    **{RESUME_KEY: _resume_state(position)})
    for old in step_checkpoints(output_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def set_aside_checkpoints_redone(output_dir: str | Path, step: int, epoch: int) -> list[str]:
    """A run resumed at optimizer step ``step`` (epoch ``epoch`` not yet done) from an older checkpoint
    redoes what the checkpoints after it hold. Left under their names they would be taken for this run's
    newest: rotated in place of the file just written, and continued by --resume auto. They are renamed
    ``*.redone.pth`` (``*.redone_2.pth``, ... on a later resume), as the log lines after it move to
    metrics.redone.jsonl: nothing is lost, and nothing of the abandoned run is continued."""
    later = [p for p in step_checkpoints(output_dir) if int(_STEP_FILE.search(p.name).group(1)) > step]
    later += [p for p in epoch_checkpoints(output_dir) if int(_EPOCH_FILE.search(p.name).group(1)) >= epoch]
    for path in later:
        set_aside(path, "redone")
    if not later:
        return []
    names = ", ".join(p.name for p in later[:3]) + (f" and {len(later) - 3} more" if len(later) > 3 else "")
    return [f"{len(later)} checkpoint(s) after the one resumed from ({names}), of the run it redoes, renamed "
            "*.redone.pth: they are not this run's, and --resume auto does not continue them"]


def earlier_run_outputs(output_dir: str | Path, resume: str) -> list[Path]:
    """What an earlier run left in ``output_dir`` that a run started with ``--resume resume`` would
    replace: its step checkpoints (rotated away, or taken for this run's newest by --resume auto)
    unless this run continues from one of them, and its metrics.jsonl unless this run resumes.

    --resume auto continues the newest checkpoint there; with none, it starts afresh over whatever
    metrics a run stopped before its first save left (a requeued job must not be refused forever).
    """
    output_dir = Path(output_dir)
    if resume == "auto":
        return []
    checkpoints = step_checkpoints(output_dir) + epoch_checkpoints(output_dir)
    if resume:
        inside = Path(resume).resolve().parent == output_dir.resolve()
        return [] if inside else checkpoints
    metrics = output_dir / "metrics.jsonl"
    logged = metrics.is_file() and metrics.stat().st_size > 0  # a run that failed before its first step logs nothing
    return checkpoints + ([metrics] if logged else [])


def changed_settings(saved: dict, current: dict, settings: tuple[str, ...] = RUN_SETTINGS) -> list[str]:
    """The ``settings`` whose value in ``current`` differs from ``saved`` (a checkpoint's args), as
    "--name saved -> current"."""
    return [f"--{key} {saved[key]} -> {current.get(key)}" for key in settings
            if key in saved and saved[key] != current.get(key)]


def resume_from(path: str | Path, model, optimizer, scaler, current_args: dict | None = None,
                steps_per_epoch: int | None = None) -> tuple[TrainingPosition | None, str]:
    """Load ``path`` into model/optimizer/scaler. A fastmae checkpoint restores everything and returns
    its position. A reference training checkpoint (main_pretrain.py's: model, optimizer, epoch) restores
    the weights and AdamW's state and returns the start of the epoch after its own, at
    ``steps_per_epoch`` of this run's steps an epoch. Any other file (released weights) loads the model
    weights only and returns None. The second value says what happened, and which of ``current_args``
    (this run's settings) differ from the checkpoint's run."""
    container = read_checkpoint(path)
    _refuse_a_classifier(path, container)
    if RESUME_KEY not in container and {"optimizer", "epoch"} <= container.keys() and steps_per_epoch:
        return _resume_reference_run(path, container, model, optimizer, scaler, current_args, steps_per_epoch)
    if RESUME_KEY not in container:
        report = load_weights(model, container)
        return None, (f"{path} is not a fastmae training checkpoint: loaded the model weights only "
                      f"(optimizer, schedule and data start fresh)\n{report}")
    _load_run_weights(path, container, model, current_args)
    load_optimizer_state(optimizer, model, container["optimizer"])  # by name: checkpoints of earlier groupings too
    if container.get("scaler") is not None and scaler.is_enabled():
        scaler.load_state_dict(container["scaler"])
    state = container[RESUME_KEY]
    restore_rng_states(state["rng"])
    position = TrainingPosition(step=int(state["step"]), epoch=int(state["epoch"]), batch=int(state["batch"]),
                                images_per_batch=int(state.get("images_per_batch", 0)),
                                unlogged=UnloggedSums(**state["unlogged"]) if "unlogged" in state else None)
    message = f"resumed from {path} at step {position.step} (epoch {position.epoch}, batch {position.batch})"
    return position, message + _changes(saved_args(container), current_args)


# the flags that decide the model's tensors: a checkpoint that does not fit was most often trained with others
ARCHITECTURE_SETTINGS = ("model", "input_size")


def _load_run_weights(path, container: dict, model, current_args: dict | None) -> None:
    """The weights of a training checkpoint, every tensor, or a ValueError naming the file and, where the
    checkpoint's run says so, the flag that makes this model another than the one it trained."""
    try:
        load_weights(model, container, strict=True)
    except ValueError as err:
        saved = saved_args(container)
        differ = [f"--{key} {saved[key]} (this run: {current_args.get(key)})" for key in ARCHITECTURE_SETTINGS
                  if current_args is not None and key in saved and saved[key] != current_args.get(key)]
        cause = (f"; the checkpoint's run was trained with {', '.join(differ)}: resume with its settings"
                 if differ else "")
        raise ValueError(f"{path} does not fit this run's model{cause}\n{err}") from None


def _refuse_a_classifier(path, container: dict) -> None:
    """A fine-tuning or linear-probe run's checkpoint (a head, no decoder, an optimizer) given to a
    pretraining resume. Released classifier weights (no optimizer) still load as weights only."""
    if not {"optimizer", "epoch"} <= container.keys():
        return
    try:
        state = state_dict_of(container)
    except ValueError:
        return  # load_weights says what is wrong with it
    if "head.weight" in state or "head.1.weight" in state:
        if not any(key.startswith(("decoder_", "mask_token")) for key in state):
            raise ValueError(f"{path} is a classifier's checkpoint (fine-tuned or linear-probed: a head, no MAE "
                             "decoder), not a pretraining run's: --resume continues MAE pretraining; to "
                             "continue the classifier, use the command that made it (fastmae finetune / linprobe "
                             "--resume)")


def _changes(saved_args: dict, current_args: dict | None) -> str:
    changed = changed_settings(saved_args, current_args) if current_args is not None else []
    return f"; these settings differ from the checkpoint's run: {', '.join(changed)}" if changed else ""


def _resume_reference_run(path, container: dict, model, optimizer, scaler, current_args: dict | None,
                          steps_per_epoch: int) -> tuple[TrainingPosition, str]:
    """A run of the reference code, continued here after its last epoch (a 400-epoch run taken to 800)."""
    _load_run_weights(path, container, model, current_args)
    try:
        load_optimizer_state(optimizer, model, container["optimizer"])
        restored = "the weights and AdamW's state"
    except (ValueError, KeyError, TypeError) as err:
        restored = f"the weights only (its optimizer state does not fit: {err}; AdamW starts afresh)"
    if container.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(container["scaler"])
    epoch = int(container["epoch"]) + 1  # the reference saves the last epoch done; its resume starts after it
    position = TrainingPosition(step=epoch * steps_per_epoch, epoch=epoch)
    settings = dict(saved_args(container))
    settings.pop("lr", None)  # the reference overwrites --lr with the lr it derives from --blr
    message = (f"resumed the reference code's run {path} after its epoch {epoch - 1}: {restored}; from epoch "
               f"{epoch} (step {position.step}) on, with a data order and random state of its own")
    return position, message + _changes(settings, current_args)
