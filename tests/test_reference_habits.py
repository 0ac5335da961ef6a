"""What users moving scripts from the reference code (facebookresearch/mae) rely on: its flags, its
log.txt, its launches."""

import pytest

from fastmae.cli import main


# ---- argument errors name the subcommand ----

@pytest.mark.parametrize("argv, prog", [
    (["linprobe", "--data_path", "d", "--no_such_flag", "1"], "fastmae linprobe"),
    (["finetune", "--data_path", "d", "--no_such_flag"], "fastmae finetune"),
    (["pretrain", "--no_such_flag"], "fastmae pretrain"),
    (["bench", "step", "--no_such_flag"], "fastmae bench step"),
])
def test_an_unknown_flag_is_reported_with_the_subcommands_usage(argv, prog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: {prog} [-h]"), err
    assert f"{prog}: error: unrecognized arguments: --no_such_flag" in err
    assert "Traceback" not in err


# ---- linprobe / finetune take the reference's flags ----

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from fastmae.cli import build_parser  # noqa: E402
from fastmae.train import metrics as metrics_module  # noqa: E402
from fastmae.train.schedule import lr_at  # noqa: E402
from test_downstream import mae_checkpoint, tiny_folder  # noqa: E402,F401  (fixtures)


class RecordingWriter:
    """A stand-in for TensorBoard's SummaryWriter (the package is optional)."""

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = Path(log_dir), [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step, value))

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def tensorboard(monkeypatch):
    writers = []

    def open_writer(log_dir):
        writers.append(RecordingWriter(log_dir))
        return writers[-1]

    monkeypatch.setattr(metrics_module, "open_tensorboard", open_writer)
    return writers


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def downstream_flags(command, data, checkpoint, out, *extra):
    return [command, "--finetune", str(checkpoint), "--data_path", str(data), "--output_dir", str(out),
            "--num_workers", "0", "--batch_size", "4", "--warmup_epochs", "1", *extra]


@pytest.mark.parametrize("command", ["linprobe", "finetune"])
def test_a_reference_command_line_runs(command, tiny_folder, mae_checkpoint, tmp_path, tensorboard, capsys):
    out, tb = tmp_path / "out", tmp_path / "tb"
    # as the reference's README gives them (less torch.distributed.launch)
    argv = downstream_flags(command, tiny_folder, mae_checkpoint, out, "--epochs", "3", "--start_epoch", "1",
                            "--dist_eval", "--pin_mem", "--log_dir", str(tb), "--blr", "0.1")
    assert main(argv) == 0, capsys.readouterr().err
    epochs = [r for r in read_jsonl(out / "log.jsonl") if not r.get("final")]
    assert [r["epoch"] for r in epochs] == [2, 3]  # epochs 1 and 2, counted from 0, as numbered in log.jsonl
    # the schedule starts at epoch 1 too: 3 batches an epoch, the last lr of the first epoch trained
    peak = 0.1 * 4 / 256
    lr_of_last_step = lr_at(1 + 2 / 3, peak, 1e-6 if command == "finetune" else 0.0, 1, 3)
    assert epochs[0]["lr"] == pytest.approx(lr_of_last_step)
    (writer,) = tensorboard
    assert writer.log_dir == tb and writer.closed
    tags = {(tag, step) for tag, step, _ in writer.scalars}
    assert tags == {(tag, epoch) for epoch in (1, 2) for tag in
                    ("train/loss", "train/lr", "perf/test_acc1", "perf/test_acc5", "perf/test_loss")}
    scalars = {(tag, step): value for tag, step, value in writer.scalars}
    assert scalars["perf/test_acc1", 2] == epochs[1]["val_top1"] and scalars["perf/test_loss", 2] == epochs[1]["val_loss"]
    assert scalars["train/loss", 1] == pytest.approx(epochs[0]["train_loss"])
    # the epoch's average lr over its 3 batches
    lrs = [lr_at(1 + i / 3, peak, 1e-6 if command == "finetune" else 0.0, 1, 3) for i in range(3)]
    assert scalars["train/lr", 1] == pytest.approx(sum(lrs) / 3)


@pytest.mark.parametrize("command", ["linprobe", "finetune"])
def test_reference_flags_parse_with_the_references_defaults(command):
    def parse(*flags):
        argv = [command, "--data_path", "d", *flags]
        parser, _ = build_parser(argv)
        return parser.parse_args(argv)

    args = parse()
    assert (args.pin_mem, args.dist_eval, args.start_epoch, args.log_dir) == (True, False, 0, None)
    assert parse("--no_pin_mem").pin_mem is False and parse("--pin_mem").pin_mem is True
    assert parse("--dist_eval").dist_eval is True and parse("--start_epoch", "5").start_epoch == 5


def test_dist_eval_help_says_the_evaluation_is_always_split(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dist_eval accepted for the reference's command lines: under torchrun or Slurm the evaluation is " \
           "always split among the processes, each val image counted once" in text


def test_pin_mem_pins_the_batches_on_their_way_to_a_gpu(tiny_folder):
    from fastmae.downstream.classify import datasets_and_loaders
    from fastmae.train.distributed import DistributedContext

    def pinned(pin_mem, device):
        args = argparse.Namespace(data_path=str(tiny_folder), batch_size=4, accum_iter=1, num_workers=0, seed=0,
                                  pin_mem=pin_mem)
        ctx = DistributedContext(device=torch.device(device))
        _, _, train_loader, val_loader = datasets_and_loaders(args, 32, True, ctx=ctx)
        return train_loader.pin_memory, val_loader.pin_memory

    assert pinned(True, "cuda") == (True, True)  # built, not iterated: no GPU needed
    assert pinned(False, "cuda") == (False, False)
    assert pinned(True, "cpu") == (False, False)  # no copy to a GPU to speed up


@pytest.mark.parametrize("command", ["linprobe", "finetune"])
def test_a_start_epoch_that_leaves_nothing_to_train_is_refused(command, tiny_folder, mae_checkpoint, tmp_path,
                                                               capsys):
    out = tmp_path / "out"
    assert main(downstream_flags(command, tiny_folder, mae_checkpoint, out, "--epochs", "2",
                                 "--start_epoch", "2")) == 2
    err = capsys.readouterr().err
    assert f"fastmae {command}: error: --start_epoch 2 leaves nothing to train: --epochs is 2" in err
    assert main(downstream_flags(command, tiny_folder, mae_checkpoint, out, "--start_epoch", "-1")) == 2
    assert "--start_epoch must be >= 0, got -1" in capsys.readouterr().err
    assert not out.exists()


def test_a_log_dir_without_tensorboard_is_said(tiny_folder, mae_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(metrics_module, "open_tensorboard", lambda log_dir: None)  # as when it is not installed
    out = tmp_path / "out"
    assert main(downstream_flags("linprobe", tiny_folder, mae_checkpoint, out, "--epochs", "1",
                                 "--log_dir", str(tmp_path / "tb"))) == 0
    assert (f"--log_dir {tmp_path / 'tb'}: no TensorBoard logs, tensorboard is not installed (pip install "
            f"'fastmae[tensorboard]'); the metrics are in {out / 'log.jsonl'}") in capsys.readouterr().out


# ---- the reference's log.txt ----

from fastmae.train.metrics import EpochLog, MetricsLogger  # noqa: E402


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """16 small PNGs: 4 batches of 4 per epoch."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def pretrain_flags(data, out, *extra):
    return ["pretrain", "--data_path", str(data), "--output_dir", str(out), "--model", "mae_vit_micro_patch4",
            "--input_size", "32", "--batch_size", "4", "--num_workers", "0", "--epochs", "2",
            "--warmup_epochs", "1", "--blr", "2e-3", "--log_every", "1", "--threads", "1", "--no_progress", *extra]


def test_pretrain_writes_the_references_log_txt_one_line_an_epoch(image_folder, tmp_path):
    out = tmp_path / "out"
    assert main(pretrain_flags(image_folder, out)) == 0
    steps = read_jsonl(out / "metrics.jsonl")  # every step logged: each step's loss and lr
    lines = (out / "log.txt").read_text().splitlines()
    assert len(lines) == 2 and all(list(json.loads(line)) == ["train_lr", "train_loss", "epoch"] for line in lines)
    for epoch, line in enumerate(lines):
        record = json.loads(line)
        mine = steps[4 * epoch:4 * epoch + 4]  # 4 steps an epoch
        assert record["epoch"] == epoch
        assert record["train_loss"] == pytest.approx(np.mean([r["loss"] for r in mine]), rel=1e-6)
        assert record["train_lr"] == pytest.approx(np.mean([r["lr"] for r in mine]), rel=1e-6)

    # the same run logging rarely, with micro-batches: the epoch's averages do not depend on the logging
    # steps, and are over iterations (micro-batches) as the reference's metric logger averages
    rare = tmp_path / "rare"
    assert main(pretrain_flags(image_folder, rare, "--log_every", "100", "--accum_iter", "2",
                               "--batch_size", "2")) == 0
    assert len(read_jsonl(rare / "metrics.jsonl")) == 1
    epochs = read_jsonl(rare / "log.txt")
    assert [r["epoch"] for r in epochs] == [0, 1]
    # 8 micro-batches of 2 an epoch, 4 optimizer steps; the lr of step s (of the epoch) is that of batch 2s
    from fastmae.train.schedule import base_batch_lr
    peak = base_batch_lr(2e-3, 4)
    expected_lr = np.mean([lr_at(epochs[0]["epoch"] + 2 * (i // 2) / 8, peak, 0.0, 1, 2) for i in range(8)])
    assert epochs[0]["train_lr"] == pytest.approx(expected_lr, rel=1e-9)
    assert all(np.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in epochs)


def test_log_txt_averages_count_the_left_over_batches_as_the_reference(image_folder, tmp_path):
    """8 batches of 2 an epoch with --accum_iter 3: 2 steps, then 2 left-over batches that make no step. As
    main_pretrain.py's metric logger, the epoch's averages are over all 8 iterations: the left-over ones at
    the lr set at batch 6, with their own losses."""
    out = tmp_path / "out"
    assert main(pretrain_flags(image_folder, out, "--accum_iter", "3", "--batch_size", "2")) == 0
    steps, epochs = read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "log.txt")
    assert len(steps) == 4 and [r["epoch"] for r in epochs] == [0, 1]
    from fastmae.train.schedule import base_batch_lr
    peak = base_batch_lr(2e-3, 6)
    for epoch, record in enumerate(epochs):
        expected_lr = np.mean([lr_at(epoch + 3 * (i // 3) / 8, peak, 0.0, 1, 2) for i in range(8)])
        assert record["train_lr"] == pytest.approx(expected_lr, rel=1e-9)
        stepped = [r["loss"] for r in steps[2 * epoch:2 * epoch + 2]]  # each the mean of its 3 micro-batches
        left_over_mean = (8 * record["train_loss"] - 3 * sum(stepped)) / 2
        assert record["train_loss"] != pytest.approx(np.mean(stepped), rel=1e-6)  # not the steps' alone
        assert 0.5 * min(stepped) < left_over_mean < 2 * max(stepped)


def test_a_resumed_pretraining_appends_to_log_txt(image_folder, tmp_path):
    out = tmp_path / "out"
    assert main(pretrain_flags(image_folder, out, "--max_steps", "6")) == 0  # stops inside epoch 1
    first = (out / "log.txt").read_text()
    assert [r["epoch"] for r in read_jsonl(out / "log.txt")] == [0]  # only whole epochs
    assert main(pretrain_flags(image_folder, out, "--resume", "auto")) == 0
    text = (out / "log.txt").read_text()
    assert text.startswith(first) and [r["epoch"] for r in read_jsonl(out / "log.txt")] == [0, 1]
    # epoch 1 averages all its steps (5 to 8), the first process's two carried in the checkpoint, as a run
    # never stopped does
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["step"] in (5, 6, 7, 8)]
    assert read_jsonl(out / "log.txt")[1]["train_loss"] == pytest.approx(np.mean([r["loss"] for r in steps]), rel=1e-6)


def test_metrics_keep_the_significant_digits_of_a_small_lr(tmp_path):
    logger = MetricsLogger(tmp_path, None, total_steps=1, start_step=0, progress_bar=False)
    logger.log({"step": 1, "epoch": 0.25, "loss": 1.234567891, "lr": 1.1286e-08, "img_per_s": 123.456789})
    logger.close()
    (record,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert record["lr"] == 1.1286e-08  # 8 decimal places made it 1e-08
    assert record["loss"] == pytest.approx(1.234567891, rel=1e-7)


def test_log_txt_lines_the_disk_refuses_wait_and_go_in_later(tmp_path):
    said = []
    log = EpochLog(tmp_path, say=said.append)
    (tmp_path / "log.txt").mkdir()  # nothing can be written there for now
    log.append({"epoch": 0})
    log.append({"epoch": 1})
    assert len(said) == 1 and "could not write to" in said[0]
    (tmp_path / "log.txt").rmdir()
    log.append({"epoch": 2})
    assert "is written again" in said[-1]
    assert [r["epoch"] for r in read_jsonl(tmp_path / "log.txt")] == [0, 1, 2]
    # a process killed mid-line: the next process's lines start on a line of their own
    with open(tmp_path / "log.txt", "a") as file:
        file.write('{"epoch": 3, "tra')
    EpochLog(tmp_path).append({"epoch": 3})
    assert (tmp_path / "log.txt").read_text().splitlines()[-1] == '{"epoch": 3}'


@pytest.mark.parametrize("command", ["linprobe", "finetune"])
def test_downstream_log_txt_is_the_references(command, tiny_folder, mae_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert main(downstream_flags(command, tiny_folder, mae_checkpoint, out, "--epochs", "1")) == 0
    assert main(downstream_flags(command, tiny_folder, mae_checkpoint, out, "--epochs", "2",
                                 "--resume", "auto")) == 0
    lines = read_jsonl(out / "log.txt")  # the resumed run appended
    assert all(list(r) == ["train_lr", "train_loss", "test_loss", "test_acc1", "test_acc5", "epoch", "n_parameters"]
               for r in lines)
    assert [r["epoch"] for r in lines] == [0, 1]
    epochs = [r for r in read_jsonl(out / "log.jsonl") if not r.get("final")]
    for line, epoch in zip(lines, epochs):
        assert (line["test_acc1"], line["test_acc5"], line["test_loss"]) == (
            epoch["val_top1"], epoch["val_top5"], epoch["val_loss"])
        assert line["train_loss"] == epoch["train_loss"]
    # trainable parameters: the head alone in a linear probe (micro: 64 wide, 2 classes), everything in fine-tuning
    classifier = torch.load(out / ("checkpoint-linprobe.pth" if command == "linprobe" else "checkpoint-last.pth"),
                            weights_only=True)["model"]
    if command == "linprobe":
        assert lines[0]["n_parameters"] == classifier["head.1.weight"].numel() + classifier["head.1.bias"].numel()
    else:
        assert lines[0]["n_parameters"] > 10 * classifier["head.weight"].numel()


# ---- Slurm launches (the reference's submitit_pretrain.py) ----

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from fastmae.train import distributed  # noqa: E402

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
                    "SLURM_STEP_NUM_TASKS")


@pytest.fixture
def launch_environment(monkeypatch):
    """No launcher's variables, whatever runs the tests; set() sets some for one test."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def set_variables(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    return set_variables


def test_slurm_tasks_take_their_ranks_from_slurm(launch_environment, monkeypatch):
    launch_environment(SLURM_PROCID=5, SLURM_LOCALID=1, SLURM_NTASKS=8)
    assert distributed.launched_ranks(8, "file:///shared/rendezvous") == (5, 8, 1)
    assert distributed.launched_ranks(1, "env://") == (0, 1, 0)  # --world_size 1: one process, as before
    monkeypatch.delenv("SLURM_LOCALID")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.launched_ranks(8, "tcp://node1:29500") == (5, 8, 1)  # the reference's rank % GPUs
    launch_environment(MASTER_ADDR="node1", MASTER_PORT=29500)
    assert distributed.launched_ranks(8, "env://") == (5, 8, 1)
    # torchrun inside a Slurm job: torchrun's variables decide
    launch_environment(RANK=3, WORLD_SIZE=16, LOCAL_RANK=3)
    assert distributed.launched_ranks(8, "env://") == (3, 16, 3)


@pytest.mark.parametrize("variables, world_size, dist_url, message", [
    (dict(SLURM_PROCID=0), 2, "env://", "--dist_url env:// under Slurm needs MASTER_ADDR and MASTER_PORT"),
    (dict(SLURM_PROCID=2), 2, "file:///x", "Slurm task SLURM_PROCID 2 is not below --world_size 2"),
    (dict(SLURM_PROCID=0, SLURM_NTASKS=4), 2, "file:///x", "--world_size 2, but this Slurm job has 4 tasks"),
    (dict(), 0, "env://", "--world_size must be >= 1, got 0"),
])
def test_a_slurm_launch_that_cannot_meet_is_a_clear_error(variables, world_size, dist_url, message, launch_environment,
                                                          tmp_path, capsys):
    launch_environment(**variables)
    out = tmp_path / "out"
    argv = ["pretrain", "--output_dir", str(out), "--max_steps", "1", "--no_progress", "--world_size",
            str(world_size), "--dist_url", dist_url, "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"fastmae pretrain: error: {message}" in err and "Traceback" not in err
    assert not out.exists()


WORLD_SIZE_IGNORED = ("--world_size 2: neither torchrun nor Slurm (SLURM_PROCID) started this process; training "
                      "with 1 process(es)")


def test_world_size_without_a_launcher_is_said(launch_environment, image_folder, tmp_path, capsys):
    assert main(pretrain_flags(image_folder, tmp_path / "out", "--max_steps", "1", "--world_size", "2")) == 0
    printed = capsys.readouterr().out
    assert WORLD_SIZE_IGNORED in printed and "cpu x 1 rank(s)" in printed


@pytest.mark.parametrize("command", ["linprobe", "finetune"])
def test_world_size_without_a_launcher_is_said_by_the_downstream_commands_too(command, launch_environment, tmp_path,
                                                                              capsys):
    # said as the process group is set up, before the flags the command reads itself are checked
    assert main([command, "--world_size", "2", "--device", "cpu", "--data_path", str(tmp_path / "missing")]) == 2
    assert WORLD_SIZE_IGNORED in capsys.readouterr().out


def test_two_slurm_tasks_train_one_model(image_folder, tmp_path):
    """submitit_pretrain.py's launch on CPU: two tasks, SLURM_PROCID 0 and 1, --world_size 2, a shared file
    to meet at; rank 0 alone writes, every rank reads its half of the images."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "fastmae", *pretrain_flags(image_folder, out), "--device", "cpu",
            "--world_size", "2", "--dist_url", f"file://{tmp_path / 'rendezvous'}"]
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    tasks = [subprocess.Popen(argv, env={**base, "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(rank),
                                         "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [task.communicate(timeout=240)[0] for task in tasks]
    finally:
        for task in tasks:
            task.kill()
    assert [task.returncode for task in tasks] == [0, 0], outputs
    assert "cpu x 2 rank(s)" in outputs[0] and "effective batch 8 = 4 x accum 1 x 2" in outputs[0], outputs[0]
    assert "2 batches of 4 per epoch per rank" in outputs[0]  # each rank reads its half of the 16 images
    steps = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # rank 0 alone logs
    epochs = read_jsonl(out / "log.txt")
    assert [r["epoch"] for r in epochs] == [0, 1]
    for epoch, record in enumerate(epochs):  # both ranks' losses: what the logging steps averaged too
        mine = steps[2 * epoch:2 * epoch + 2]
        assert record["train_loss"] == pytest.approx(np.mean([r["loss"] for r in mine]), rel=1e-6)
    # the epochs' checkpoints (0 and the last, 1), rank 0 alone writing them
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == [
        "checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-step00000002.pth", "checkpoint-step00000004.pth"]


# ---- --data_loader's help says what auto picks ----

def test_data_loader_help_names_what_auto_picks(monkeypatch, capsys):
    from fastmae.data import loader

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "auto: DALI if installed and on CUDA, else hybrid on CUDA" in text and "torchvision GPU decode" not in text
    # what the code picks on CUDA without DALI
    monkeypatch.setattr(loader, "_importable", lambda module: False)
    cfg = loader.DataConfig(data_path="/data", input_size=32, batch_size=4, num_workers=0, pin_mem=False, seed=0,
                            loader="auto")
    assert loader.resolve_loader(cfg, torch.device("cuda")) == "hybrid"
    assert loader.resolve_loader(cfg, torch.device("cpu")) == "cpu"


def test_loader_workers_share_a_node_among_its_slurm_tasks(launch_environment):
    """Eight Slurm tasks on one node each took up to 10 workers: the cores are shared by the node's tasks."""
    single = distributed.DistributedContext()
    launched = distributed.DistributedContext(rank=3, world_size=16, local_rank=3)
    assert single.ranks_on_this_machine() == 1 == launched.ranks_on_this_machine()
    launch_environment(SLURM_PROCID=3, SLURM_TASKS_PER_NODE="8(x2)")
    assert launched.ranks_on_this_machine() == 8 and single.ranks_on_this_machine() == 1
    launch_environment(SLURM_NTASKS_PER_NODE=4)
    assert launched.ranks_on_this_machine() == 4
    launch_environment(LOCAL_WORLD_SIZE=2)  # torchrun's word wins
    assert launched.ranks_on_this_machine() == 2


def test_srun_tasks_without_world_size_are_refused_not_trained_as_copies(launch_environment):
    launch_environment(SLURM_PROCID=1, SLURM_STEP_NUM_TASKS=2)
    with pytest.raises(ValueError, match=r"task 1 of the 2 that srun started .* --world_size is 1: give --world_size 2"):
        distributed.launched_ranks(1, "env://")
    launch_environment(SLURM_STEP_NUM_TASKS=1)  # one task (srun -n 1, or the batch script): one process
    assert distributed.launched_ranks(1, "env://") == (0, 1, 0)
    launch_environment(SLURM_STEP_NUM_TASKS=2, RANK=1, WORLD_SIZE=2)  # torchrun inside srun: torchrun's ranks
    assert distributed.launched_ranks(1, "env://") == (1, 2, 0)
