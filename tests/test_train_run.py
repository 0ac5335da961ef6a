"""`fastmae pretrain` end to end on the micro model: flags, exact resume, a non-finite loss, atomic
checkpoints, SIGTERM."""

import argparse
import contextlib
import errno
import json
import os
import shutil
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastmae.train.trainer as trainer_module
from fastmae.checkpoint import read_checkpoint
from fastmae.cli import main as fastmae_main
from fastmae.device import device_from_flag
from fastmae.train.checkpoints import RESUME_KEY, latest_checkpoint, step_checkpoint_path
from fastmae.train.config import DEMO_SETTINGS, PretrainConfig, default_num_workers
from fastmae.train.metrics import MetricsLogger, as_one_run, plot_loss_curve, read_metrics
from fastmae.train.output_lock import OutputFolderLock
from fastmae.train.pretrain import EXPLICIT_FLAGS_ATTR, add_arguments
from full_disk import refuse_writes

REPO = Path(__file__).resolve().parents[1]


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """16 small noise-and-gradient PNGs in class folders: 4 batches of 4 per epoch."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 48)[None, :, None]
    for i in range(16):
        folder = root / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(ramp * (i % 3 + 1) / 3 + rng.normal(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def micro_flags(data, out, *extra):
    return ["pretrain", "--data_path", str(data), "--output_dir", str(out), "--model", "mae_vit_micro_patch4",
            "--input_size", "32", "--batch_size", "4", "--num_workers", "0", "--epochs", "3",
            "--warmup_epochs", "1", "--blr", "2e-3", "--log_every", "1", "--threads", "1", "--no_progress", *extra]


def logged(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ---- flags ----

def test_defaults_are_the_paper_recipe():
    args = parse([])
    assert (args.blr, args.warmup_epochs, args.weight_decay, args.mask_ratio) == (1.5e-4, 40, 0.05, 0.75)
    assert (args.model, args.batch_size, args.input_size, args.accum_iter) == ("mae_vit_large_patch16", 64, 224, 1)
    assert (args.output_dir, args.min_lr, args.lr, args.pin_mem, args.norm_pix_loss) == ("./output_dir", 0.0, None, True, False)
    assert args.data_path is None and args.resume == "" and args.precision is None and args.max_steps is None


def test_loader_workers_default_to_the_references_10_within_the_cores_of_each_rank(monkeypatch):
    assert parse([]).num_workers is None  # chosen when the run starts, on its machine
    for cores, ranks, workers in [(128, 8, 10), (16, 1, 10), (8, 1, 7), (2, 1, 1), (16, 8, 1), (1, 1, 1)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert default_num_workers(ranks) == workers, (cores, ranks)


def test_reference_flags_parse_with_their_meanings():
    args = parse(["--batch_size", "32", "--epochs", "5", "--accum_iter", "4", "--model", "mae_vit_base_patch16",
                  "--input_size", "112", "--mask_ratio", "0.6", "--norm_pix_loss", "--weight_decay", "0.1",
                  "--lr", "1e-3", "--blr", "2e-4", "--min_lr", "1e-6", "--warmup_epochs", "2", "--data_path", "/d",
                  "--output_dir", "/o", "--log_dir", "/l", "--device", "cpu", "--seed", "7", "--resume", "auto",
                  "--start_epoch", "1", "--num_workers", "3", "--no_pin_mem", "--world_size", "2",
                  "--local_rank", "0", "--dist_url", "env://", "--dist_on_itp",
                  "--max_steps", "9", "--precision", "fp16", "--compile", "--kernels", "torch", "--attn", "math",
                  "--data_loader", "cpu", "--save_every", "50"])
    cfg, demo = PretrainConfig.from_args(args, getattr(args, EXPLICIT_FLAGS_ATTR))
    assert demo == {}
    assert (cfg.batch_size, cfg.epochs, cfg.accum_iter, cfg.model, cfg.input_size) == (32, 5, 4, "mae_vit_base_patch16", 112)
    assert (cfg.mask_ratio, cfg.norm_pix_loss, cfg.weight_decay, cfg.lr, cfg.blr, cfg.min_lr) == (0.6, True, 0.1, 1e-3, 2e-4, 1e-6)
    assert (cfg.warmup_epochs, cfg.data_path, cfg.output_dir, cfg.log_dir, cfg.device, cfg.seed) == (2, "/d", "/o", "/l", "cpu", 7)
    assert (cfg.resume, cfg.start_epoch, cfg.num_workers, cfg.pin_mem) == ("auto", 1, 3, False)
    assert (cfg.max_steps, cfg.precision, cfg.compile, cfg.kernels, cfg.attn) == (9, "fp16", True, "torch", "math")
    assert (cfg.data_loader, cfg.save_every) == ("cpu", 50)
    with pytest.raises(SystemExit):
        parse(["--precision", "fp8"])


def test_demo_settings_only_for_flags_not_set():
    args = parse(["--batch_size", "8", "--epochs", "2"])
    cfg, demo = PretrainConfig.from_args(args, getattr(args, EXPLICIT_FLAGS_ATTR))
    assert cfg.model == DEMO_SETTINGS["model"] and cfg.input_size == DEMO_SETTINGS["input_size"]
    assert (cfg.batch_size, cfg.epochs) == (8, 2) and "batch_size" not in demo and "model" in demo
    args = parse(["--data_path", "/d"])
    cfg, demo = PretrainConfig.from_args(args, getattr(args, EXPLICIT_FLAGS_ATTR))
    assert demo == {} and cfg.model == "mae_vit_large_patch16"


def test_a_cuda_device_the_machine_does_not_have_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_from_flag("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        device_from_flag("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda:1 was asked for but torch sees no CUDA device"):
        device_from_flag("cuda:1")
    assert device_from_flag("auto") == device_from_flag(None) == torch.device("cpu")


@pytest.mark.parametrize("flags,message", [
    (["--mask_ratio", "1.0"], "mask_ratio"),
    (["--mask_ratio", "0"], "0 removes no patch"),
    (["--batch_size", "0"], "batch_size"),
    (["--threads", "0"], "threads"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**63), got -1"),
    (["--data_path", "MISSING"], "does not exist"),
    (["--model", "mae_vit_gigantic"], "--model mae_vit_gigantic: unknown model"),
    (["--input_size", "34"], "--input_size 34 is not a multiple of mae_vit_micro_patch4's patch size 4"),
    (["--resume", "MISSING/ckpt.pth"], "no such file"),
    (["--resume", "DATA"], "is a folder, not a checkpoint file, and holds no .pth or .safetensors file"),
    (["--mask_ratio", "0.99"], "--mask_ratio 0.99: mask_ratio 0.99 leaves no visible patch out of 64"),
    (["--mask_ratio", "1e-17"], "--mask_ratio 1e-17 removes none of the 64 patches of an image"),
    (["--blr", "-1"], "--blr must be positive, got -1.0"),
    (["--output_dir", ""], "--output_dir is empty (''): main_pretrain.py then saves nothing"),
    (["--weight_decay", "-0.5"], "--weight_decay must be >= 0, got -0.5"),
    (["--device", "mps"], "--device mps: fastmae runs on cpu or cuda, not mps"),
    (["--device", "cuda:x"], "--device cuda:x: not a device; give cpu, cuda or cuda:N"),
])
def test_bad_input_is_a_message_and_exit_2_before_any_work(tmp_path, image_folder, capsys, flags, message):
    out = tmp_path / "out"
    flags = [f.replace("MISSING", str(tmp_path / "missing")).replace("DATA", str(image_folder)) for f in flags]
    argv = micro_flags(image_folder, out)
    for flag, value in zip(flags[::2], flags[1::2]):  # override the micro settings
        i = argv.index(flag) if flag in argv else None
        argv = argv[:i] + argv[i + 2:] if i is not None else argv
        argv += [flag, value]
    assert fastmae_main(argv) == 2
    err = capsys.readouterr().err
    assert "fastmae pretrain: error:" in err and message in err
    assert not out.exists()


# ---- training runs ----

def test_stopped_and_resumed_run_logs_exactly_the_uninterrupted_losses(tmp_path, image_folder):
    flags = ["--accum_iter", "2", "--save_every", "100"]  # 2 steps per epoch, 6 in all
    threads = torch.get_num_threads()
    assert fastmae_main(micro_flags(image_folder, tmp_path / "straight", *flags)) == 0
    assert torch.get_num_threads() == threads  # --threads 1 held for the run only
    straight = logged(tmp_path / "straight")
    assert [r["step"] for r in straight] == [1, 2, 3, 4, 5, 6]

    assert fastmae_main(micro_flags(image_folder, tmp_path / "split", *flags, "--max_steps", "3")) == 0
    assert latest_checkpoint(tmp_path / "split").name == "checkpoint-step00000003.pth"  # mid-epoch 1
    assert fastmae_main(micro_flags(image_folder, tmp_path / "split", *flags, "--resume", "auto")) == 0
    split = logged(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]
    assert [r["lr"] for r in split] == [r["lr"] for r in straight]
    assert straight[-1]["loss"] < straight[0]["loss"]
    final_a = read_checkpoint(step_checkpoint_path(tmp_path / "straight", 6))
    final_b = read_checkpoint(step_checkpoint_path(tmp_path / "split", 6))
    assert all(torch.equal(final_a["model"][k], final_b["model"][k]) for k in final_a["model"])
    # the reference container, plus the resume fields; the 'epoch' field is the last completed epoch
    assert {"model", "optimizer", "epoch", "args"} <= set(final_a) and "scaler" not in final_a and final_a["epoch"] == 2
    assert final_a[RESUME_KEY]["step"] == 6 and final_a["args"]["accum_iter"] == 2
    assert (tmp_path / "straight" / "reconstruction.png").stat().st_size > 1000
    assert (tmp_path / "straight" / "loss.png").stat().st_size > 1000


def test_a_resume_says_which_run_settings_differ_from_the_checkpoints(tmp_path, image_folder, capsys):
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "2")) == 0
    capsys.readouterr()
    # a longer schedule (often meant) and another loss (seldom): said; where the run is written: not a run setting
    assert fastmae_main(micro_flags(image_folder, out, "--resume", "auto", "--max_steps", "3", "--epochs", "4",
                                    "--norm_pix_loss", "--num_workers", "1")) == 0
    printed = capsys.readouterr().out
    assert "these settings differ from the checkpoint's run: --norm_pix_loss False -> True, --epochs 3 -> 4" in printed
    assert fastmae_main(micro_flags(image_folder, out, "--resume", "auto", "--max_steps", "4", "--epochs", "4",
                                    "--norm_pix_loss")) == 0
    assert "resumed from" in (printed := capsys.readouterr().out) and "differ" not in printed


def test_resume_from_a_reference_checkpoint_loads_weights_only(tmp_path, image_folder, capsys):
    from fastmae.models import create_model

    reference_file = tmp_path / "mae_pretrain.pth"
    torch.save({"model": create_model("mae_vit_micro_patch4").state_dict(), "epoch": 399}, reference_file)
    assert fastmae_main(micro_flags(image_folder, tmp_path / "out", "--resume", str(reference_file), "--max_steps", "1")) == 0
    assert "not a fastmae training checkpoint: loaded the model weights only" in capsys.readouterr().out
    assert [r["step"] for r in logged(tmp_path / "out")] == [1]


def reference_run_checkpoint(path, epoch: int, steps: int = 2):
    """What main_pretrain.py saves after ``epoch``: its model (the re-derived reference) trained ``steps``
    AdamW steps over timm's add_weight_decay groups [no decay: 1-D and biases, decay], an fp16
    scaler, and its args, whose lr it derived from blr."""
    from reference_mae import ReferenceMAE

    torch.manual_seed(5)
    ref = ReferenceMAE(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=48,
                       decoder_depth=1, decoder_num_heads=4)
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in named if p.ndim <= 1 or n.endswith(".bias")]
    decay = [p for n, p in named if not (p.ndim <= 1 or n.endswith(".bias"))]
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.05}],
                            lr=1e-3, betas=(0.9, 0.95))
    for _ in range(steps):
        opt.zero_grad()
        ref(torch.randn(2, 3, 32, 32), 0.75, torch.rand(2, 64))[0].backward()
        opt.step()
    args = argparse.Namespace(model="mae_vit_micro_patch4", input_size=32, batch_size=4, epochs=2, blr=2e-3,
                              lr=2e-3 * 4 / 256, mask_ratio=0.75, norm_pix_loss=False, weight_decay=0.05)
    torch.save({"model": ref.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 0}, "args": args}, path)
    return ref, opt


def test_a_reference_run_continues_after_its_last_epoch_with_its_adamw_state(tmp_path, image_folder, capsys):
    from fastmae.models import create_model
    from fastmae.train.checkpoints import resume_from
    from fastmae.train.optim import build_optimizer

    path = tmp_path / "checkpoint-1.pth"
    ref, ref_opt = reference_run_checkpoint(path, epoch=1)
    model = create_model("mae_vit_micro_patch4", kernels="torch")
    optimizer = build_optimizer(model, 1e-3, 0.05)
    position, message = resume_from(path, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                     steps_per_epoch=4)
    assert (position.epoch, position.batch, position.step) == (2, 0, 8)
    assert "the weights and AdamW's state" in message, message
    ours = {name: optimizer.state[p] for name, p in model.named_parameters() if p.requires_grad}
    theirs = {name: ref_opt.state[p] for name, p in ref.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and len(ours) == 48
    for name in ours:  # matched by name, across groups split and ordered otherwise
        assert torch.equal(ours[name]["exp_avg"], theirs[name]["exp_avg"]), name
        assert torch.equal(ours[name]["exp_avg_sq"], theirs[name]["exp_avg_sq"]) and float(ours[name]["step"]) == 2
    # the command: the schedule goes on from the reference's next epoch, the changed settings named
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--resume", str(path), "--epochs", "3")) == 0
    printed = capsys.readouterr().out
    assert (f"resumed the reference code's run {path} after its epoch 1: the weights and AdamW's state; from epoch 2 "
            "(step 8) on" in printed), printed
    assert "these settings differ from the checkpoint's run: --epochs 2 -> 3" in printed and "--lr" not in printed
    assert [r["step"] for r in logged(out)] == [9, 10, 11, 12]


def test_non_finite_loss_stops_and_names_the_last_good_checkpoint(tmp_path, image_folder, monkeypatch, capsys):
    real_step = trainer_module.train_step
    calls = []

    def step_that_diverges_at_call_4(*args, **kwargs):
        losses = real_step(*args, **kwargs)
        calls.append(1)
        return losses * float("nan") if len(calls) >= 4 else losses

    monkeypatch.setattr(trainer_module, "train_step", step_that_diverges_at_call_4)
    out = tmp_path / "out"
    status = fastmae_main(micro_flags(image_folder, out, "--log_every", "3", "--save_every", "2"))
    assert status == trainer_module.EXIT_NONFINITE
    printed = capsys.readouterr().out
    assert "non-finite" in printed and str(step_checkpoint_path(out, 2)) in printed
    # the step-4 state came after the non-finite loss: it is never saved
    assert latest_checkpoint(out) == step_checkpoint_path(out, 2)
    assert [r["step"] for r in logged(out)] == [3]
    assert json.loads((out / "summary.json").read_text())["whole_run"]["steps"] == 3  # the finite window


class DelayedLoader:
    """The trainer's loader, calling ``wait()`` before each batch arrives (a sleep, or a fake clock's tick)."""

    def __init__(self, loader, wait):
        self.loader, self.wait = loader, wait

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # set_epoch, skipped
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            self.wait()
            yield batch


def test_summary_reports_speed_and_the_time_spent_waiting_for_data(tmp_path, image_folder, monkeypatch, capsys):
    real_build = trainer_module.build_loader
    monkeypatch.setattr(trainer_module, "build_loader", lambda *a, **kw: DelayedLoader(real_build(*a, **kw), lambda: time.sleep(0.2)))
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "4", "--log_every", "2")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmark"] == "train" and summary["loader"] == "cpu" and summary["environment"]["git"]["commit"]
    assert (summary["first_step"], summary["warmup_steps"], summary["timed_steps"]) == (0, 2, 2)
    whole, steady = summary["whole_run"], summary["after_first_window"]
    assert (whole["steps"], whole["images"], steady["steps"], steady["images"]) == (4, 16, 2, 8)
    assert whole["img_per_s"] == pytest.approx(whole["images"] / whole["seconds"])
    # 0.2 s of waiting per batch against a micro model's few milliseconds of compute
    assert 0.5 < steady["data_wait_fraction"] <= 1 and steady["seconds"] >= 2 * 0.2
    assert steady["data_wait_fraction"] == pytest.approx(logged(out)[1]["data_wait"], abs=1e-6)  # the same window
    assert [summary["first_loss"], summary["last_loss"]] == pytest.approx([r["loss"] for r in logged(out)], abs=1e-7)
    assert "waiting for data" in capsys.readouterr().out
    # a resumed run sums up its own steps
    monkeypatch.undo()
    assert fastmae_main(micro_flags(image_folder, out, "--resume", "auto", "--max_steps", "6", "--log_every", "2")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["first_step"] == 4 and summary["whole_run"]["steps"] == 2 and summary["timed_steps"] == 0
    assert summary["after_first_window"]["img_per_s"] is None


def test_a_non_finite_loss_after_a_resume_names_the_steps_of_this_run(tmp_path, image_folder, monkeypatch, capsys):
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "2")) == 0
    real_step = trainer_module.train_step
    monkeypatch.setattr(trainer_module, "train_step", lambda *a, **kw: real_step(*a, **kw) * float("nan"))
    status = fastmae_main(micro_flags(image_folder, out, "--resume", "auto", "--log_every", "2"))
    assert status == trainer_module.EXIT_NONFINITE
    assert "non-finite between optimizer steps 3 and 4" in capsys.readouterr().out


def test_a_log_dir_without_tensorboard_is_said_not_ignored(tmp_path, image_folder, monkeypatch, capsys):
    import fastmae.train.metrics as metrics_module

    monkeypatch.setattr(metrics_module, "open_tensorboard", lambda log_dir: None)  # as when it is not installed
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "1", "--log_dir", str(tmp_path / "tb"))) == 0
    assert (f"--log_dir {tmp_path / 'tb'}: no TensorBoard logs, tensorboard is not installed (pip install "
            f"'fastmae[tensorboard]'); the metrics are in {out / 'metrics.jsonl'}") in capsys.readouterr().out
    assert fastmae_main(micro_flags(image_folder, tmp_path / "out2", "--max_steps", "1")) == 0  # the default: quiet
    assert "TensorBoard" not in capsys.readouterr().out


def test_running_out_of_device_memory_stops_with_what_to_change(tmp_path, image_folder, monkeypatch, capsys):
    out = tmp_path / "out"
    real_step, calls = trainer_module.train_step, []

    def step_that_runs_out(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.19 GiB of which 1.06 GiB is free.\nmore detail")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", step_that_runs_out)
    status = fastmae_main(micro_flags(image_folder, out, "--save_every", "2", "--accum_iter", "2"))
    assert status == trainer_module.EXIT_OUT_OF_MEMORY
    printed = capsys.readouterr().out
    assert ("out of cpu memory in optimizer step 3 with --batch_size 4 per rank (CUDA out of memory. Tried to "
            "allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free.). Lower "
            "--batch_size and raise --accum_iter by the same factor: the effective batch (8)") in printed, printed
    assert f"the last checkpoint saved is {step_checkpoint_path(out, 2)} (continue from it with --resume auto)" in printed
    assert latest_checkpoint(out) == step_checkpoint_path(out, 2)


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path, image_folder):
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "2")) == 0
    good = step_checkpoint_path(out, 2)
    before = good.read_bytes()
    # resume, and SIGKILL the process half-way through writing the step-3 checkpoint
    script = f"""
import os, signal, sys, torch
import fastmae.checkpoint as checkpoint
real_save = torch.save
def save_then_die(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    f.flush()
    f.truncate(f.tell() // 2)
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.torch.save = save_then_die
from fastmae.cli import main
sys.exit(main({micro_flags(image_folder, out, "--resume", "auto", "--max_steps", "3")!r}))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert good.read_bytes() == before and latest_checkpoint(out) == good
    assert not step_checkpoint_path(out, 3).exists()
    assert read_checkpoint(good)[RESUME_KEY]["step"] == 2
    # the leftover partial file is ignored: resuming continues from step 2
    assert fastmae_main(micro_flags(image_folder, out, "--resume", "auto", "--max_steps", "3")) == 0
    assert latest_checkpoint(out) == step_checkpoint_path(out, 3)


def test_resume_auto_with_a_damaged_newest_checkpoint_names_the_one_before_it(tmp_path, image_folder, capsys):
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "4", "--save_every", "2")) == 0
    newest, before = step_checkpoint_path(out, 4), step_checkpoint_path(out, 2)
    os.truncate(newest, newest.stat().st_size // 2)  # copied in part
    capsys.readouterr()
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "5", "--resume", "auto")) == 2
    error = capsys.readouterr().err
    assert f"checkpoint {newest} is not a readable PyTorch or safetensors file" in error, error
    assert f"the one before it is {before}: give --resume {before}, or move {newest.name} out of {out}" in error
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "5", "--resume", str(before))) == 0
    assert latest_checkpoint(out) == step_checkpoint_path(out, 5)


def _refuse_saves_of_steps(monkeypatch, steps):
    """The checkpoints of ``steps`` fail part-way through their write, as on a full disk: inside torch.save,
    which turns the file's OSError into its own RuntimeError."""
    refuse_writes(monkeypatch, [step_checkpoint_path(".", step).name for step in steps])


def test_a_periodic_checkpoint_the_disk_refuses_is_reported_and_training_goes_on(tmp_path, image_folder,
                                                                                 monkeypatch, capsys):
    out = tmp_path / "out"
    _refuse_saves_of_steps(monkeypatch, [4])
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "8", "--save_every", "2",
                                    "--keep_checkpoints", "2")) == 0
    printed = capsys.readouterr().out
    assert ("could not save the checkpoint of step 4 as " in printed and "No space left on device" in printed
            and f"the last checkpoint saved is {step_checkpoint_path(out, 2)}" in printed
            and "training goes on and tries again at step 6" in printed), printed
    assert [p.name for p in sorted(out.glob("checkpoint-step*.pth"))] == [
        "checkpoint-step00000006.pth", "checkpoint-step00000008.pth"]
    assert not list(out.glob(".*tmp")) and logged(out)[-1]["step"] == 8


def test_a_refused_save_says_when_the_next_try_is(tmp_path, image_folder, monkeypatch, capsys):
    """It said step + --save_every: step 69 of a 64-step run, and a step past the epoch checkpoint that came first.
    4 steps an epoch: the try after step 3 is epoch 0's checkpoint at step 4."""
    _refuse_saves_of_steps(monkeypatch, [3, 8])
    status = fastmae_main(micro_flags(image_folder, tmp_path / "out", "--epochs", "2", "--save_every", "3",
                                      "--save_epochs", "1"))
    printed = capsys.readouterr().out
    assert status == trainer_module.EXIT_NOT_SAVED
    assert "step 3 as" in printed and "training goes on and tries again at step 4" in printed, printed  # epoch 0's end
    assert printed.count("could not save the checkpoint of step 8") == 2  # the epoch's, then the run's last
    assert "step 8 as" in printed and "it is tried once more now, as the run's last checkpoint" in printed, printed


def test_an_epoch_checkpoint_refused_at_a_save_every_step_is_tried_once(tmp_path, image_folder, monkeypatch, capsys):
    """Step 4 ends epoch 0 and is a multiple of --save_every 2: its refused epoch checkpoint was tried again at
    once by the periodic save, with the message twice."""
    _refuse_saves_of_steps(monkeypatch, [4])
    assert fastmae_main(micro_flags(image_folder, tmp_path / "out", "--max_steps", "8", "--save_every", "2",
                                    "--save_epochs", "1")) == 0
    printed = capsys.readouterr().out
    assert printed.count("could not save the checkpoint of step 4") == 1, printed
    assert "training goes on and tries again at step 6" in printed


def test_a_final_checkpoint_the_disk_refuses_stops_with_a_message_and_keeps_the_earlier_ones(
        tmp_path, image_folder, monkeypatch, capsys):
    out = tmp_path / "out"
    _refuse_saves_of_steps(monkeypatch, [5])
    status = fastmae_main(micro_flags(image_folder, out, "--max_steps", "5", "--save_every", "2"))
    assert status == trainer_module.EXIT_NOT_SAVED
    printed = capsys.readouterr().out
    assert (f"could not save the checkpoint of step 5 as {step_checkpoint_path(out, 5)}: [Errno 28] No space left"
            in printed and f"the last checkpoint saved is {step_checkpoint_path(out, 4)}" in printed), printed
    assert latest_checkpoint(out) == step_checkpoint_path(out, 4) and not list(out.glob(".*tmp"))
    # the run resumes from there once the disk has room
    monkeypatch.undo()
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "5", "--resume", "auto")) == 0
    assert latest_checkpoint(out) == step_checkpoint_path(out, 5)


def test_figures_and_summary_the_disk_refuses_are_said_after_the_checkpoint_is_saved(tmp_path, image_folder,
                                                                                   monkeypatch, capsys):
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "2")) == 0
    earlier = {name: (out / name).read_bytes() for name in ("reconstruction.png", "loss.png", "summary.json")}
    refuse_writes(monkeypatch, earlier, room=16)
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "3", "--resume", "auto")) == 0
    printed = capsys.readouterr().out
    assert latest_checkpoint(out) == step_checkpoint_path(out, 3)
    for name in earlier:
        assert (f"{out / name} could not be written (the earlier one is kept): [Errno 28] No space left on device"
                in printed), printed
        assert (out / name).read_bytes() == earlier[name]  # not truncated, not half-written
    assert not list(out.glob(".*tmp"))


def test_a_full_disk_before_the_first_step_is_refused_with_a_message(tmp_path, image_folder, monkeypatch, capsys):
    def full_disk(output_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer_module.OutputFolderLock, "acquire", full_disk)
    assert fastmae_main(micro_flags(image_folder, tmp_path / "out")) == 2
    assert (f"--output_dir {tmp_path / 'out'}: nothing can be written there: [Errno 28] No space left on device"
            in capsys.readouterr().err)


def test_a_disk_without_room_for_a_checkpoint_is_said_at_the_start(tmp_path, image_folder, monkeypatch, capsys):
    real_disk_usage = trainer_module.shutil.disk_usage
    monkeypatch.setattr(trainer_module.shutil, "disk_usage",
                        lambda path: real_disk_usage(path)._replace(free=2**20))
    assert fastmae_main(micro_flags(image_folder, tmp_path / "out", "--max_steps", "1")) == 0
    printed = capsys.readouterr().out
    assert (f"the disk holding --output_dir {tmp_path / 'out'} has 1 MiB free, and a checkpoint of this run takes "
            "about " in printed), printed
    monkeypatch.undo()
    assert fastmae_main(micro_flags(image_folder, tmp_path / "out2", "--max_steps", "1")) == 0
    assert "MiB free" not in capsys.readouterr().out


class _DiskFullForAWhile:
    """metrics.jsonl's file on a disk that is full while ``full`` is set; with room, the kernel takes at
    most 7 bytes a write (short writes, which the logger must continue)."""

    def __init__(self, file):
        self.file, self.full = file, False

    def write(self, data) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(bytes(data[:7]))

    def close(self) -> None:
        self.file.close()


def test_metrics_the_disk_refuses_wait_in_memory_and_go_in_once_there_is_room(tmp_path, capsys):
    def record(step):
        return {"step": step, "epoch": 0.0, "loss": 1.0 / step, "lr": 1e-4, "img_per_s": 100.0}

    logger = MetricsLogger(tmp_path, None, total_steps=9, start_step=0, progress_bar=False)
    disk = logger.file = _DiskFullForAWhile(logger.file)
    logger.log(record(1))
    disk.full = True
    logger.log(record(2))
    logger.log(record(3))
    printed = capsys.readouterr().out
    assert printed.count("could not write to") == 1 and "No space left on device" in printed, printed
    disk.full = False
    logger.log(record(4))
    assert "metrics.jsonl is written again" in capsys.readouterr().out
    assert [r["step"] for r in logged(tmp_path)] == [1, 2, 3, 4]
    disk.full = True
    logger.log(record(5))
    logger.close()
    assert "1 logging step(s) could not be written to " in capsys.readouterr().out
    # a process killed mid-line: a resumed run's records start on a line of their own
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 5, "lo')
    logger = MetricsLogger(tmp_path, None, total_steps=9, start_step=5, progress_bar=False, append=True)
    logger.log(record(6))
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 6]
    # resumed from step 2's checkpoint: steps 3 and 4 are logged again, and the later records count
    resumed = read_metrics(tmp_path / "metrics.jsonl") + [dict(record(step), img_per_s=50.0) for step in (3, 4)]
    assert [(r["step"], r["img_per_s"]) for r in as_one_run(resumed)] == [(1, 100.0), (2, 100.0), (3, 50.0), (4, 50.0)]
    assert plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("to_group", [False, True], ids=["to-the-process", "to-its-group-and-workers"])
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path, image_folder, to_group):
    """SIGTERM to the training process, or to its whole process group as Slurm's preemption, `timeout`
    and `kill -TERM -PGID` send it: the loader's worker processes receive it too and must keep serving
    the main process until it has saved."""
    out = tmp_path / "out"
    workers = ("--num_workers", "2") if to_group else ()
    argv = micro_flags(image_folder, out, "--epochs", "1000", "--save_every", "100000", *workers)
    process = subprocess.Popen([sys.executable, "-m", "fastmae", *argv], cwd=REPO, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    if to_group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, output
    if to_group:  # the workers, which ignore the signal, exit with the main process
        assert not _alive_in_group(process.pid, within_s=10)
    saved = latest_checkpoint(out)
    assert saved is not None and "received SIGTERM: saved" in output and str(saved) in output
    step = read_checkpoint(saved)[RESUME_KEY]["step"]
    assert step >= 2 and logged(out)[-1]["step"] <= step
    # the summary covers the logged steps of the stopped run
    assert json.loads((out / "summary.json").read_text())["whole_run"]["steps"] == logged(out)[-1]["step"]
    assert fastmae_main(micro_flags(image_folder, out, "--epochs", "1000", "--resume", "auto",
                                    "--max_steps", str(step + 2))) == 0
    assert [r["step"] for r in logged(out)][-2:] == [step + 1, step + 2]


def test_a_run_that_fails_with_loader_workers_alive_still_exits(tmp_path, image_folder):
    """An error out of the training loop (here an unexpected one in step 2) while the loader's worker
    processes serve: the process ends with the traceback. The workers ignore SIGTERM (a group-wide stop
    signal is the main process's to handle), and multiprocessing's exit hook terminates them with
    SIGTERM and waits for them: that must not hang."""
    out = tmp_path / "out"
    script = f"""
import sys
import fastmae.train.trainer as trainer_module
from fastmae.cli import main
real_step, calls = trainer_module.train_step, []
def failing_step(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise RuntimeError("an unexpected failure")
    return real_step(*args, **kwargs)
trainer_module.train_step = failing_step
sys.exit(main({micro_flags(image_folder, out, "--num_workers", "2")!r}))
"""
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=60)
    finally:
        if _alive_in_group(process.pid, within_s=0):  # hung: leave nothing behind
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 1 and "RuntimeError: an unexpected failure" in output, output
    assert not _alive_in_group(process.pid, within_s=10)


def _alive_in_group(pgid: int, within_s: float) -> bool:
    """Whether a process of group ``pgid`` is still running ``within_s`` seconds from now (zombies,
    which an init that does not reap would leave, do not count)."""
    def running() -> bool:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:  # "pid (name) state ppid pgrp ...": the name may hold spaces and parentheses
                state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, IndexError, ValueError):
                continue  # the process ended meanwhile
            if int(pgrp) == pgid and state != "Z":
                return True
        return False

    deadline = time.time() + within_s
    while running():
        if time.time() > deadline:
            return True
        time.sleep(0.1)
    return False


def test_a_run_into_a_folder_another_run_is_writing_is_refused_until_that_run_ends(tmp_path, image_folder, capsys):
    """A job submitted twice: the second stops before writing anything, and a killed holder leaves no stale lock."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fastmae.train.output_lock import OutputFolderLock; "
         "lock = OutputFolderLock.acquire(sys.argv[1]); print('holding', flush=True); time.sleep(120)", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "2")) == 2
        err = capsys.readouterr().err
        assert f"--output_dir {out} is in use by another fastmae run (pid {holder.pid} on " in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        # the live run has logged and saved: its files are not "an earlier run's" to continue with --resume auto
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
        step_checkpoint_path(out, 1).write_bytes(b"the live run's checkpoint")
        assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "2")) == 2
        err = capsys.readouterr().err
        assert f"--output_dir {out} is in use by another fastmae run (pid {holder.pid} on " in err, err
    finally:
        holder.kill()
        holder.wait()
    for name in ("metrics.jsonl", step_checkpoint_path(out, 1).name):
        (out / name).unlink()
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "2")) == 0
    assert latest_checkpoint(out) == step_checkpoint_path(out, 2)


def test_a_killed_runs_forked_children_do_not_keep_its_folder_locked(tmp_path):
    """A run killed with SIGKILL while its DataLoader workers (forked) live on for a while: a requeue that
    starts at once is not refused in the dead run's name."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time; from fastmae.train.output_lock import OutputFolderLock; "
         "lock = OutputFolderLock.acquire(sys.argv[1]); child = os.fork()\n"
         "if child == 0: time.sleep(60); os._exit(0)\n"
         "print(child, flush=True); time.sleep(120)", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        holder.kill()
        holder.wait()
        assert os.path.exists(f"/proc/{child}")  # the forked child outlives its parent
        OutputFolderLock.acquire(out).release()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_second_run_of_the_same_process_into_a_locked_folder_is_refused_and_the_lock_kept(tmp_path):
    """A record lock belongs to the process: a second acquire of the same process succeeded, and probing
    who held the folder (closing a descriptor of the file) dropped the lock for every other process."""
    out = tmp_path / "out"
    lock = OutputFolderLock.acquire(out)
    try:
        with pytest.raises(ValueError, match=rf"--output_dir {out} is in use by another fastmae run \(this process"):
            OutputFolderLock.acquire(out)
        assert OutputFolderLock.holder(out).startswith("this process, pid ")
        other = subprocess.run([sys.executable, "-c", "import sys; from fastmae.train.output_lock import "
                                "OutputFolderLock as L; print(L.holder(sys.argv[1]))", str(out)],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
        assert other.stdout.startswith(f"pid {os.getpid()} on "), other.stdout + other.stderr  # still held
    finally:
        lock.release()
    OutputFolderLock.acquire(out).release()  # released: free again
    OutputFolderLock.acquire(out)  # dropped without release(): collected, its file closed, free again
    OutputFolderLock.acquire(out).release()


def test_keeps_only_the_newest_checkpoints(tmp_path, image_folder):
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "5", "--save_every", "1",
                                    "--keep_checkpoints", "2", "--log_every", "5")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-step*.pth")) == ["checkpoint-step00000004.pth", "checkpoint-step00000005.pth"]
    assert not list(out.glob(".*tmp"))


def test_a_fresh_run_refuses_a_folder_holding_an_earlier_run(tmp_path, image_folder, capsys):
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "3")) == 0
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "1")) == 2  # forgot --resume
    err = capsys.readouterr().err
    assert "holds an earlier run (checkpoint-step00000003.pth, metrics.jsonl)" in err and "--resume auto" in err
    # resuming from a checkpoint of another folder would mix the two runs' files
    other = tmp_path / "other"
    assert fastmae_main(micro_flags(image_folder, other, "--max_steps", "2")) == 0
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "4", "--resume",
                                    str(other / "checkpoint-step00000002.pth"))) == 2
    assert "holds another run's checkpoints (checkpoint-step00000003.pth)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written  # nothing replaced, nothing added
    # what the message offers works: continue the run, or start afresh elsewhere
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "4", "--resume", "auto")) == 0
    assert [r["step"] for r in logged(out)] == [1, 2, 3, 4]
    summary = (out / "summary.json").read_text()
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "4", "--resume", "auto")) == 0  # nothing to do
    assert (out / "summary.json").read_text() == summary and "of the earlier process kept" in capsys.readouterr().out
    assert fastmae_main(micro_flags(image_folder, tmp_path / "fresh", "--max_steps", "1")) == 0


def test_tensorboard_scalars_when_installed(tmp_path, image_folder):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "2")) == 0
    events = EventAccumulator(str(out))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, image_folder, precision):
    out = tmp_path / precision
    assert fastmae_main(micro_flags(image_folder, out, "--precision", precision, "--max_steps", "2")) == 0
    records = logged(out)
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    saved = read_checkpoint(step_checkpoint_path(out, 2))
    assert saved["args"]["precision"] == precision
    assert ("scaler" in saved) == (precision == "fp16")  # only a scaler in use is saved (the reference refuses {})


def test_start_epoch_and_absolute_lr(tmp_path, image_folder):
    from fastmae.train.schedule import lr_at

    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--start_epoch", "2", "--lr", "1e-3", "--max_steps", "1")) == 0
    (record,) = logged(out)
    # 4 batches per epoch; the first step of epoch 2 of 3, warm-up 1: on the cosine
    assert record["lr"] == pytest.approx(lr_at(2.0, 1e-3, 0.0, 1, 3)) and record["epoch"] == 2.25


@pytest.mark.gpu
@pytest.mark.parametrize("mode, flags", [("eager", ["--cuda_graph", "off"]), ("cuda_graph", []),
                                         ("compiled", ["--compile"])], ids=["eager", "default", "compiled"])
def test_pretraining_on_the_gpu_with_its_gpu_loader(tmp_path, mode, flags):
    """The whole command on CUDA: JPEGs through the GPU loader auto picks, bf16, the step replayed as a
    CUDA graph unless compiled or turned off, a checkpoint, the summary, and --resume auto continuing."""
    from fastmae.data.synthetic import write_jpeg_folder

    jpegs, out = tmp_path / "jpegs", tmp_path / "out"
    write_jpeg_folder(jpegs, 16, size=(48, 40), num_classes=2)
    extra = ["--device", "cuda", "--log_every", "2", *flags]
    assert fastmae_main(micro_flags(jpegs, out, "--max_steps", "4", *extra)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loader"] in ("dali", "hybrid") and summary["environment"]["device_type"] == "cuda"
    assert summary["cuda_graph"] == (mode == "cuda_graph")
    assert summary["whole_run"]["steps"] == 4 and summary["after_first_window"]["img_per_s"] > 0
    assert all(np.isfinite(r["loss"]) for r in logged(out))
    assert latest_checkpoint(out) is not None
    assert fastmae_main(micro_flags(jpegs, out, "--resume", "auto", "--max_steps", "6", *extra)) == 0
    assert json.loads((out / "summary.json").read_text())["first_step"] == 4 and logged(out)[-1]["step"] == 6


@pytest.mark.gpu
def test_training_step_never_waits_for_the_gpu():
    from fastmae.data.augment import normalize
    from fastmae.models import create_model
    from fastmae.train.optim import build_optimizer
    from fastmae.train.trainer import _LogWindow, mask_noise_seed, train_step

    device = torch.device("cuda")
    model = create_model("mae_vit_micro_patch4").to(device)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    window = _LogWindow(device, 0.0, 0)
    generator = torch.Generator(device=device)
    pixels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8).pin_memory()

    def step(index):
        imgs = normalize(pixels.to(device, non_blocking=True))
        generator.manual_seed(mask_noise_seed(0, index, 0, 0))
        noise = torch.rand(8, 64, generator=generator, device=device)
        window.add(train_step(model, optimizer, scaler, [(imgs, noise)], 0.75, torch.bfloat16), 8)

    step(0)  # warm-up: lazy CUDA initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for index in range(1, 4):
            step(index)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert window.count == 4 and torch.isfinite(window.loss_sum).item()


def test_resume_with_another_batch_size_continues_after_the_same_images(tmp_path, image_folder, capsys):
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "2")) == 0  # 8 of the 16 images of epoch 0
    assert fastmae_main(micro_flags(image_folder, out, "--resume", "auto", "--max_steps", "3",
                                    "--batch_size", "8")) == 0
    assert "continuing at batch 1 of epoch 0" in capsys.readouterr().out
    last = logged(out)[-1]
    assert last["step"] == 3 and last["epoch"] == 1.0  # the second batch of 8 ends epoch 0


# ---- found by mutation testing: what a run computes and reports, checked against the recipe ----

def write_noise_images(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def micro_trainer(image_folder, out, **overrides):
    from fastmae.train.distributed import DistributedContext
    from fastmae.train.trainer import Pretrainer

    cfg = PretrainConfig(**{"data_path": str(image_folder), "output_dir": str(out), "model": "mae_vit_micro_patch4",
                            "input_size": 32, "batch_size": 4, "num_workers": 0, "epochs": 3, "warmup_epochs": 1,
                            "progress_bar": False, **overrides})
    return Pretrainer(cfg, DistributedContext())


def test_logged_lr_is_the_per_iteration_schedule_of_the_scaled_peak(tmp_path, image_folder):
    from fastmae.train.schedule import lr_at

    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--accum_iter", "2", "--min_lr", "1e-5", "--save_every", "100")) == 0
    records = logged(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    # peak = blr x effective batch / 256, effective batch = batch_size 4 x accum_iter 2 x 1 rank
    peak = 2e-3 * 4 * 2 / 256
    # 4 micro-batches per epoch, 2 per step: the lr of step k is set at its first micro-batch, epoch (k - 1) / 2
    expected = [lr_at((k - 1) / 2, peak, 1e-5, 1, 3) for k in range(1, 7)]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=0, abs=1e-8)  # metrics.jsonl keeps 8 decimals
    assert records[1]["lr"] == pytest.approx(peak / 2, abs=1e-8)  # half-way through the warm-up epoch


def test_the_batches_left_after_an_epochs_last_whole_step_make_no_step(tmp_path, monkeypatch, capsys):
    """engine_pretrain.py steps after every accum_iter batches and zeroes the gradients of the rest
    when the next epoch starts: 5 batches at --accum_iter 2 make 2 steps an epoch, of 2 batches each."""
    data = write_noise_images(tmp_path / "images", 20)  # 5 micro-batches of 4 per epoch
    out = tmp_path / "out"
    steps = []
    real_train_step = trainer_module.train_step

    def counted(model, optimizer, scaler, micro_batches, *args, **kwargs):
        steps.append(len(micro_batches))
        return real_train_step(model, optimizer, scaler, micro_batches, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", counted)
    assert fastmae_main(micro_flags(data, out, "--epochs", "2", "--accum_iter", "2", "--min_lr", "1e-5")) == 0
    assert steps == [2, 2, 2, 2]
    records = logged(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["epoch"] for r in records] == pytest.approx([2 / 5, 1.0, 7 / 5, 2.0], abs=1e-4)
    # the lr of each step is set at its first batch, at epoch + batch / 5, as lr_sched.adjust_learning_rate
    from fastmae.train.schedule import lr_at

    peak = 2e-3 * 4 * 2 / 256
    expected = [lr_at(e, peak, 1e-5, 1, 2) for e in (0, 2 / 5, 1, 7 / 5)]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=0, abs=1e-8)
    assert fastmae_main(micro_flags(data, tmp_path / "none", "--accum_iter", "6")) == 2
    assert "an epoch has 5 batch(es) of 4 per rank, fewer than --accum_iter 6" in capsys.readouterr().err


def test_a_resumed_position_among_an_epochs_left_over_batches(tmp_path, capsys):
    """Another batch size may convert the position to one past the epoch's last whole step: the run
    goes back to that step, and the epoch ends as any other (its log.txt line). A smaller --accum_iter's
    checkpoint there: the epoch's steps are done, and the run says so."""
    data = write_noise_images(tmp_path / "images", 40)  # 10 batches of 4, 5 of 8
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(data, out, "--accum_iter", "2", "--max_steps", "4")) == 0  # at batch 8 of 10
    capsys.readouterr()
    assert fastmae_main(micro_flags(data, out, "--resume", "auto", "--batch_size", "8", "--accum_iter", "2",
                                    "--epochs", "1")) == 0
    # batch 8 of 4 images is batch 4 of 8, among the left-over 5th: back to batch 2, the epoch's last step
    assert "continuing at batch 2 of epoch 0" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]
    other = tmp_path / "other"
    assert fastmae_main(micro_flags(data, other, "--max_steps", "9")) == 0  # accum 1: at batch 9 of 10
    capsys.readouterr()
    assert fastmae_main(micro_flags(data, other, "--resume", "auto", "--accum_iter", "3", "--epochs", "2")) == 0
    assert ("stopped at batch 9 of epoch 0, after its last whole step of --accum_iter 3 (the 1 left-over batch(es) "
            "make no step): continuing at epoch 1") in capsys.readouterr().out
    assert logged(other)[-1]["epoch"] == 2.0


def test_resuming_an_older_checkpoint_moves_the_lines_it_logs_again(tmp_path, image_folder, capsys):
    """metrics.jsonl and log.txt read as one run after a resume from a checkpoint behind the logs; the
    lines of the steps and epochs done again are kept in metrics.redone.jsonl and log.redone.txt."""
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--epochs", "2", "--save_every", "4", "--keep_checkpoints",
                                    "3")) == 0
    first = logged(out)
    assert [r["step"] for r in first] == list(range(1, 9))
    capsys.readouterr()
    assert fastmae_main(micro_flags(image_folder, out, "--epochs", "2", "--resume",
                                    str(step_checkpoint_path(out, 4)))) == 0
    assert "4 line(s) of metrics.jsonl after the checkpoint (logged again by this run) moved to metrics.redone.jsonl" \
        in capsys.readouterr().out
    again = logged(out)
    assert [r["step"] for r in again] == list(range(1, 9))  # each step once
    assert [r["loss"] for r in again] == [r["loss"] for r in first]  # the same steps, done again exactly
    redone = [json.loads(line) for line in (out / "metrics.redone.jsonl").read_text().splitlines()]
    assert redone == first[4:]
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0, 1]
    assert [json.loads(line)["epoch"] for line in (out / "log.redone.txt").read_text().splitlines()] == [1]


def test_resuming_an_older_checkpoint_sets_the_later_checkpoints_aside(tmp_path, image_folder, capsys):
    """The checkpoints after the one resumed from belong to the run being redone: left under their names,
    rotation took them for the newest and deleted the file just written, and --resume auto went back
    to them. They are renamed *.redone.pth; this run's saves are kept and continued."""
    out = tmp_path / "out"
    flags = ("--epochs", "2", "--save_every", "2", "--keep_checkpoints", "2", "--save_epochs", "1")
    assert fastmae_main(micro_flags(image_folder, out, *flags)) == 0
    assert [p.name for p in sorted(out.glob("checkpoint-*.pth"))] == [
        "checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-step00000006.pth", "checkpoint-step00000008.pth"]
    capsys.readouterr()
    assert fastmae_main(micro_flags(image_folder, out, *flags, "--max_steps", "5", "--blr", "1e-3",
                                    "--resume", str(out / "checkpoint-0.pth"))) == 0
    said = capsys.readouterr().out
    assert ("3 checkpoint(s) after the one resumed from (checkpoint-step00000006.pth, checkpoint-step00000008.pth, "
            "checkpoint-1.pth), of the run it redoes, renamed *.redone.pth") in said
    assert f"done at step 5: checkpoint {step_checkpoint_path(out, 5)}" in said
    assert step_checkpoint_path(out, 5).is_file() and latest_checkpoint(out) == step_checkpoint_path(out, 5)
    assert {p.name for p in out.glob("*.redone.pth")} == {
        "checkpoint-step00000006.redone.pth", "checkpoint-step00000008.redone.pth", "checkpoint-1.redone.pth"}
    assert fastmae_main(micro_flags(image_folder, out, *flags, "--blr", "1e-3", "--resume", "auto")) == 0
    said = capsys.readouterr().out
    assert f"resumed from {step_checkpoint_path(out, 5)}" in said and "done at step 8" in said
    assert read_checkpoint(out / "checkpoint-1.pth")["args"]["blr"] == 1e-3  # this run's epoch 1, not the first's


def test_resume_with_a_larger_accum_iter_between_its_steps_starts_at_the_boundary_before(tmp_path, image_folder,
                                                                                         capsys):
    """Stopped at batch 3 (accum 1); resumed with --accum_iter 2, whose steps start at even batches: it read
    past the epoch's end (a bare StopIteration) and saved nothing."""
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "3")) == 0  # at batch 3 of 4
    capsys.readouterr()
    assert fastmae_main(micro_flags(image_folder, out, "--resume", "auto", "--accum_iter", "2", "--epochs", "2")) == 0
    said = capsys.readouterr().out
    assert ("the checkpoint stopped at batch 3 of epoch 0, between two steps of --accum_iter 2: continuing at batch 2, "
            "the step boundary before it (batch(es) 2 to 2 are seen again)") in said
    assert logged(out)[-1]["epoch"] == 2.0
    # the losses the checkpoint carried (batches 0 to 2) are not added to those of the batches done again:
    # epoch 0's line averages the one step after the resume (batches 2 and 3), which its metrics line holds
    first_epoch = json.loads((out / "log.txt").read_text().splitlines()[0])
    step_4 = next(r for r in logged(out) if r["step"] == 4)
    assert first_epoch["epoch"] == 0 and first_epoch["train_loss"] == pytest.approx(step_4["loss"], rel=1e-6)


def test_a_run_stopped_between_two_logging_steps_logs_on_resume_what_it_would_have(tmp_path, image_folder,
                                                                                   monkeypatch, capsys):
    """SIGTERM in step 5 of 8 (logging every 3, 4 steps an epoch): the resumed run's line at step 6 averages
    steps 4 to 6 and log.txt's epoch 1 steps 5 to 8, as in a run never stopped; they averaged the steps
    after the resume alone."""
    flags = ("--epochs", "2", "--log_every", "3")
    straight = tmp_path / "straight"
    assert fastmae_main(micro_flags(image_folder, straight, *flags)) == 0
    real_step, calls = trainer_module.train_step, []

    def stopped_in_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            signal.raise_signal(signal.SIGTERM)
        return real_step(*args, **kwargs)

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "train_step", stopped_in_step_5)
        assert fastmae_main(micro_flags(image_folder, stopped, *flags)) == 128 + signal.SIGTERM
    assert latest_checkpoint(stopped) == step_checkpoint_path(stopped, 5)
    assert json.loads((stopped / "summary.json").read_text())["whole_run"]["steps"] == 5  # 4 and 5 in no line
    assert fastmae_main(micro_flags(image_folder, stopped, *flags, "--resume", "auto")) == 0
    keys = ("step", "epoch", "loss", "lr")
    assert [{k: r[k] for k in keys} for r in logged(stopped)] == [{k: r[k] for k in keys} for r in logged(straight)]
    assert [r["step"] for r in logged(stopped)] == [3, 6, 8]
    assert (stopped / "log.txt").read_text() == (straight / "log.txt").read_text()


def test_resume_with_another_batch_size_starts_on_an_optimizer_step_boundary(tmp_path, image_folder, capsys):
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "3")) == 0  # 12 of the 16 images of epoch 0
    capsys.readouterr()
    assert fastmae_main(micro_flags(image_folder, out, "--resume", "auto", "--max_steps", "4", "--batch_size", "8",
                                    "--accum_iter", "2")) == 0
    # 12 images are 1.5 micro-batches of 8; a step is 2 of them: back to the step that starts at batch 0
    assert "continuing at batch 0 of epoch 0" in capsys.readouterr().out
    last = logged(out)[-1]
    assert last["step"] == 4 and last["epoch"] == 1.0


def test_data_wait_is_the_share_of_time_spent_waiting_for_batches(tmp_path, image_folder, monkeypatch):
    """A fake clock: each micro-batch takes 1 s to arrive, each optimizer step 2 s to compute."""

    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now

    clock = Clock()
    real_build_loader, real_train_step = trainer_module.build_loader, trainer_module.train_step

    def tick():
        clock.now += 1.0

    def slow_step(*args, **kwargs):
        clock.now += 2.0
        return real_train_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "time", clock)
    monkeypatch.setattr(trainer_module, "build_loader", lambda *args: DelayedLoader(real_build_loader(*args), tick))
    monkeypatch.setattr(trainer_module, "train_step", slow_step)
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--accum_iter", "2", "--max_steps", "3")) == 0
    # each step: 2 micro-batches x 1 s waiting + 2 s computing, so 2 s of 4 spent waiting, 8 images in 4 s
    assert [(r["data_wait"], r["img_per_s"]) for r in logged(out)] == pytest.approx([(0.5, 2.0)] * 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["whole_run"] == pytest.approx(
        {"steps": 3, "images": 24, "seconds": 12.0, "img_per_s": 2.0, "data_wait_fraction": 0.5})
    assert summary["after_first_window"] == pytest.approx(
        {"steps": 2, "images": 16, "seconds": 8.0, "img_per_s": 2.0, "data_wait_fraction": 0.5})


def test_a_logging_step_reports_the_totals_of_all_ranks(tmp_path, image_folder, monkeypatch, capsys):
    from fastmae.train.distributed import DistributedContext
    from fastmae.train.trainer import _LogWindow

    trainer = micro_trainer(image_folder, tmp_path / "out")
    try:
        # rank 0 of 2 ranks that did the same: the all-reduce doubles every sum
        trainer.ctx = DistributedContext(rank=0, world_size=2)
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *args, **kwargs: tensor.mul_(2))
        monkeypatch.setattr(trainer_module, "time", argparse.Namespace(perf_counter=lambda: 2.0))
        trainer.data._skips.count = 3  # unreadable images this rank passed over
        window = _LogWindow(torch.device("cpu"), 0.0, 0)
        window.add(torch.tensor([1.0, 3.0]), images=8)
        window.data_wait = 0.5
        trainer._log(window)
    finally:
        trainer.logger.close()
    (record,) = logged(tmp_path / "out")
    assert record["loss"] == pytest.approx(2.0)  # the mean over every micro-batch of every rank
    assert record["img_per_s"] == pytest.approx(8.0)  # 8 images on each of 2 ranks in 2 s
    assert record["data_wait"] == pytest.approx(0.25)
    assert record["skipped_images"] == 6
    assert "skipped 6 unreadable image(s)" in capsys.readouterr().out
    assert (trainer.totals.whole.images, trainer.totals.whole.data_wait_s) == (16, 0.5)  # summary.json's totals


def test_masking_noise_differs_per_rank_micro_batch_and_step(tmp_path, image_folder):
    from fastmae.train.distributed import DistributedContext

    trainer = micro_trainer(image_folder, tmp_path / "out")
    trainer.logger.close()
    base = trainer._mask_noise(5, 0, 4)
    assert base.shape == (4, trainer.model.num_patches)
    assert torch.equal(base, trainer._mask_noise(5, 0, 4))  # keyed: a resumed run draws the same masks
    assert not torch.equal(base, trainer._mask_noise(5, 1, 4))  # the next micro-batch of the step
    assert not torch.equal(base, trainer._mask_noise(6, 0, 4))  # the next step
    trainer.ctx = DistributedContext(rank=1, world_size=2)
    assert not torch.equal(base, trainer._mask_noise(5, 0, 4))  # another rank


def test_resume_restores_optimizer_grad_scaler_rng_and_position(tmp_path):
    from fastmae.models import create_model
    from fastmae.train.checkpoints import TrainingPosition, resume_from, save_training_checkpoint
    from fastmae.train.optim import build_optimizer

    model = create_model("mae_vit_micro_patch4")
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    model(torch.randn(2, 3, 32, 32), 0.75)[0].backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7, enabled=True)  # as --precision fp16
    position = TrainingPosition(step=7, epoch=2, batch=3, images_per_batch=8)
    path = save_training_checkpoint(tmp_path, model, optimizer, scaler, position, args={"seed": 0}, keep=2)
    draws_after_save = torch.rand(3)

    torch.manual_seed(123)
    fresh = create_model("mae_vit_micro_patch4")
    fresh_optimizer = build_optimizer(fresh, lr=1e-3, weight_decay=0.05)
    fresh_scaler = torch.amp.GradScaler("cpu", enabled=True)
    restored, message = resume_from(path, fresh, fresh_optimizer, fresh_scaler)
    assert restored == position and "step 7" in message
    assert fresh_scaler.get_scale() == 512.0 and fresh_scaler.state_dict()["growth_interval"] == 7
    assert torch.equal(torch.rand(3), draws_after_save)  # the RNG continues where the saved run was
    saved, loaded = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and len(saved) > 0
    assert all(torch.equal(saved[i][k], loaded[i][k]) for i in saved for k in saved[i])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_default_schedule_length_is_the_papers():
    args = parse([])
    assert args.epochs == 800 and PretrainConfig(data_path="").epochs == 800  # the paper's ablation length


def test_a_long_run_of_unreadable_files_mid_epoch_is_a_message_and_exit_2(tmp_path, capsys):
    """Read in a DataLoader worker: the error is the command's own message, with each file's reason."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # "a..." sorts first: the loader's start-up check reads a good image
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(data / f"a{i}.png")
    for i in range(40):
        (data / f"b{i:02d}.png").write_bytes(b"not a picture")
    argv = micro_flags(data, tmp_path / "out", "--seed", "3")
    argv[argv.index("--num_workers") + 1] = "1"
    assert fastmae_main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"fastmae pretrain: error: 32 unreadable images in a row, e\.g\. \S+b\d\d\.png "
                     r"\(UnidentifiedImageError: cannot identify image file\); .*: check the files under --data_path "
                     r"\(stopped at step \d+; no checkpoint of this run is saved yet\)", err), err
    assert "Traceback" not in err


def test_resume_at_the_end_of_the_schedule_says_there_is_nothing_to_train(tmp_path, image_folder, capsys):
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--epochs", "2")) == 0
    assert "blr 0.002 x effective batch / 256" in capsys.readouterr().out
    assert fastmae_main(micro_flags(image_folder, out, "--epochs", "1", "--resume", "auto")) == 0
    assert ("nothing to train: the run is at step 8, epoch 2, already at the end that --epochs 1 sets (raise it to "
            "go on)") in capsys.readouterr().out
    # a --max_steps beyond the end: the limit reached is --epochs'
    assert fastmae_main(micro_flags(image_folder, out, "--epochs", "2", "--max_steps", "40", "--resume", "auto")) == 0
    assert "already at the end that --epochs 2 sets" in capsys.readouterr().out
    assert fastmae_main(micro_flags(image_folder, tmp_path / "lr", "--lr", "1e-3", "--max_steps", "1")) == 0
    assert "peak lr 0.001 (--lr, which is blr 0.064 at this effective batch)" in capsys.readouterr().out


def test_a_resume_that_does_not_fit_the_model_names_the_flag_or_the_kind_of_checkpoint(tmp_path, image_folder, capsys):
    """--resume auto under another --model named the newest checkpoint as damaged and advised the one
    before it (which fails the same way); a classifier's checkpoint read as a half-loaded model."""
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--max_steps", "4", "--save_every", "2")) == 0
    capsys.readouterr()
    argv = micro_flags(image_folder, out, "--resume", "auto")
    argv[argv.index("--model") + 1] = "mae_vit_demo_patch8"
    assert fastmae_main(argv) == 2
    err = capsys.readouterr().err
    assert (f"{step_checkpoint_path(out, 4)} does not fit this run's model; the checkpoint's run was trained with "
            "--model mae_vit_micro_patch4 (this run: mae_vit_demo_patch8): resume with its settings") in err, err
    assert "the one before it" not in err
    classifier = tmp_path / "ft.pth"
    state = {k: v for k, v in read_checkpoint(step_checkpoint_path(out, 4))["model"].items()
             if not k.startswith(("decoder_", "mask_token"))}
    state.update({"head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)})
    torch.save({"model": state, "optimizer": {}, "epoch": 3, "args": {}}, classifier)
    assert fastmae_main(micro_flags(image_folder, tmp_path / "other", "--resume", str(classifier))) == 2
    assert (f"{classifier} is a classifier's checkpoint (fine-tuned or linear-probed: a head, no MAE decoder), not a "
            "pretraining run's") in capsys.readouterr().err


def test_our_checkpoint_resumes_the_references_way_and_an_earlier_grouping_resumes_here(tmp_path, image_folder):
    """main_pretrain.py's load_model on our file: its AdamW over timm's add_weight_decay groups loads our
    optimizer state (same groups, same order), and no empty 'scaler' (a disabled GradScaler's {}) is there
    for it to refuse. And a checkpoint of fastmae's earlier grouping ([decay, no decay], tokens not
    decayed) still resumes, its moments matched by name."""
    from fastmae.checkpoint import save_checkpoint
    from fastmae.models import create_model
    from fastmae.train.checkpoints import resume_from
    from fastmae.train.optim import build_optimizer

    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--epochs", "1")) == 0
    path = latest_checkpoint(out)
    container = torch.load(path, weights_only=True)
    assert "scaler" not in container  # fp32 on CPU: no scaler in use
    model = create_model("mae_vit_micro_patch4", kernels="torch")
    model.load_state_dict(container["model"])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    reference_opt = torch.optim.AdamW(
        [{"params": [p for n, p in named if p.ndim <= 1 or n.endswith(".bias")], "weight_decay": 0.0},
         {"params": [p for n, p in named if not (p.ndim <= 1 or n.endswith(".bias"))], "weight_decay": 0.05}],
        lr=1e-3, betas=(0.9, 0.95))
    reference_opt.load_state_dict(container["optimizer"])
    resumed_model = create_model("mae_vit_micro_patch4", kernels="torch")
    resumed = build_optimizer(resumed_model, 1e-3, 0.05)
    resume_from(path, resumed_model, resumed, torch.amp.GradScaler("cpu", enabled=False))
    by_name = {n: resumed.state[p] for n, p in resumed_model.named_parameters() if p.requires_grad}
    for name, param in named:  # the reference's optimizer holds our moments, parameter by parameter
        assert torch.equal(reference_opt.state[param]["exp_avg"], by_name[name]["exp_avg"]), name

    # the earlier grouping: the same moments saved as [decay without the tokens, no decay with them]
    tokens = ("cls_token", "mask_token")
    earlier_decay = [n for n, p in named if p.ndim > 1 and not n.endswith(".bias") and n not in tokens]
    earlier_no_decay = [n for n, _ in named if n not in earlier_decay]
    order = earlier_decay + earlier_no_decay
    earlier = {"state": {i: by_name[name] for i, name in enumerate(order)},
               "param_groups": [{**resumed.state_dict()["param_groups"][1], "params": list(range(len(earlier_decay)))},
                                {**resumed.state_dict()["param_groups"][0],
                                 "params": list(range(len(earlier_decay), len(order)))}]}
    old = tmp_path / "earlier.pth"
    save_checkpoint(old, resumed_model, None, epoch=0, **{k: v for k, v in container.items()
                                                          if k not in ("model", "epoch", "optimizer")})
    torch.save({**torch.load(old, weights_only=True), "optimizer": earlier}, old)
    again_model = create_model("mae_vit_micro_patch4", kernels="torch")
    again = build_optimizer(again_model, 1e-3, 0.05)
    resume_from(old, again_model, again, torch.amp.GradScaler("cpu", enabled=False))
    for name, param in again_model.named_parameters():
        if param.requires_grad:
            assert torch.equal(again.state[param]["exp_avg_sq"], by_name[name]["exp_avg_sq"]), name


def test_the_references_epoch_checkpoints_are_kept_and_resume_exactly(tmp_path, image_folder, capsys):
    """Scripts look for main_pretrain.py's checkpoint-{epoch}.pth (every 20 epochs and the last)."""
    from fastmae.train.checkpoints import epoch_checkpoints

    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--save_epochs", "2")) == 0  # 3 epochs: 0, and 2 (the last)
    assert [p.name for p in epoch_checkpoints(out)] == ["checkpoint-0.pth", "checkpoint-2.pth"]
    first = torch.load(out / "checkpoint-0.pth", weights_only=True)
    assert first["epoch"] == 0 and {"model", "optimizer", "args"} <= set(first)
    assert f"epoch 0 done: {out / 'checkpoint-0.pth'}" in capsys.readouterr().out
    straight = logged(out)
    again = tmp_path / "again"  # from the end of epoch 0, the uninterrupted run's losses
    assert fastmae_main(micro_flags(image_folder, again, "--save_epochs", "2", "--resume",
                                    str(out / "checkpoint-0.pth"))) == 0
    resumed = logged(again)
    assert resumed and [r["loss"] for r in resumed] == [r["loss"] for r in straight[-len(resumed):]]
    assert resumed[0]["step"] == first["fastmae_resume"]["step"] + 1
    # a fresh run does not write over an earlier run's epoch checkpoints
    only_epochs = tmp_path / "only_epochs"
    only_epochs.mkdir()
    shutil.copy(out / "checkpoint-2.pth", only_epochs)
    assert fastmae_main(micro_flags(image_folder, only_epochs)) == 2
    assert "checkpoint-2.pth" in capsys.readouterr().err
    assert fastmae_main(micro_flags(image_folder, tmp_path / "none", "--save_epochs", "0")) == 0
    assert epoch_checkpoints(tmp_path / "none") == []
    # the last epoch's checkpoint is the final step checkpoint, kept under both names (one file on disk)
    assert (out / "checkpoint-2.pth").samefile(latest_checkpoint(out))


def test_resume_auto_continues_from_epoch_checkpoints_and_a_fresh_restart_keeps_the_earlier_logs(
        tmp_path, image_folder, capsys):
    """A folder holding checkpoint-{epoch}.pth alone (copied, or a run killed before its first step
    checkpoint) is continued by --resume auto, not restarted over them; a folder with an earlier run's
    logs and no checkpoint is started afresh, its logs set aside."""
    out = tmp_path / "out"
    assert fastmae_main(micro_flags(image_folder, out, "--save_epochs", "1")) == 0
    straight = logged(out)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / "checkpoint-1.pth", alone)
    capsys.readouterr()
    assert fastmae_main(micro_flags(image_folder, alone, "--save_epochs", "1", "--resume", "auto")) == 0
    assert f"resumed from {alone / 'checkpoint-1.pth'}" in capsys.readouterr().out
    resumed = logged(alone)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[-len(resumed):]]
    assert [json.loads(line)["epoch"] for line in (alone / "log.txt").read_text().splitlines()] == [2]
    # killed before any checkpoint: refused without --resume, and the message says what --resume auto does
    killed = tmp_path / "killed"
    killed.mkdir()
    earlier_metrics, earlier_log = '{"step": 1, "loss": 1.0}\n', '{"train_lr": 0.1, "train_loss": 1.0, "epoch": 0}\n'
    (killed / "metrics.jsonl").write_text(earlier_metrics)
    (killed / "log.txt").write_text(earlier_log)
    capsys.readouterr()
    assert fastmae_main(micro_flags(image_folder, killed)) == 2
    assert "no checkpoint of it to continue: give another --output_dir, or --resume auto to start afresh there" in \
        capsys.readouterr().err
    # --resume auto starts afresh, the new logs beside the earlier ones (nothing written before is lost)
    assert fastmae_main(micro_flags(image_folder, killed, "--resume", "auto")) == 0
    assert "the earlier run's metrics.jsonl is kept as metrics.restarted.jsonl" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in (killed / "log.txt").read_text().splitlines()] == [0, 1, 2]
    assert (killed / "metrics.restarted.jsonl").read_text() == earlier_metrics
    assert (killed / "log.restarted.txt").read_text() == earlier_log
    assert logged(killed)[0]["step"] == 1 and len(logged(killed)) > 1
