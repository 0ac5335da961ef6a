"""linprobe and finetune in several processes (torchrun's variables, gloo on CPU), and resumed runs
that repeat the epochs of a run never stopped."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from fastmae.cli import main as fastmae_main
from fastmae.downstream.classify import EpochLogs
from fastmae.downstream.sharding import InOrderShard, TrainKeys
from gloo_threads import gloo_threads
from test_downstream import mae_checkpoint, tiny_folder  # noqa: F401  (fixtures)


def _rank_main(rank: int, world_size: int, init_file: str, argv: list[str]) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    assert fastmae_main(argv + ["--dist_url", f"file://{init_file}"]) == 0
    assert gloo_threads() == []  # the process group went in full: nothing left to abort this process's exit


def run_on_ranks(argv: list[str], world_size: int, tmp_path, name: str) -> None:
    mp.spawn(_rank_main, args=(world_size, str(tmp_path / f"rendezvous_{name}"), argv), nprocs=world_size, join=True)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(path) -> dict:
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("num_items,world_size", [(12, 2), (13, 2), (10, 3), (5, 4)])
def test_the_ranks_share_an_epoch_and_each_sample_keeps_its_key(num_items, world_size):
    shares = []
    for rank in range(world_size):
        keys = TrainKeys(num_items, seed=3, rank=rank, world_size=world_size)
        keys.set_epoch(2)
        shares.append(list(keys))
        assert len(keys) == len(shares[-1]) == -(-num_items // world_size)
    single = TrainKeys(num_items, seed=3)
    single.set_epoch(2)
    merged = sorted((key for share in shares for key in share), key=lambda key: key[2])
    # the ranks' keys interleaved are one process's epoch (up to the reference's wrap-around padding)
    assert merged[:num_items] == list(single)
    assert {key[0] for key in merged} == set(range(num_items)) and all(key[1] == 2 for key in merged)
    single.set_epoch(3)
    assert [key[0] for key in single] != [key[0] for key in merged[:num_items]]  # a new order each epoch
    val = [list(InOrderShard(num_items, rank, world_size)) for rank in range(world_size)]
    assert sorted(sum(val, [])) == list(range(num_items))  # every val item exactly once
    padded = [list(InOrderShard(num_items, rank, world_size, pad=True)) for rank in range(world_size)]
    assert len({len(share) for share in padded}) == 1 and set(sum(padded, [])) == set(range(num_items))


def test_finetune_on_two_processes_trains_as_one_process_with_their_batches_together(tiny_folder, mae_checkpoint,
                                                                                    tmp_path):
    """RandAugment and random erasing on (no drop path, no mixup: those draw per process): two processes
    of batch 2 see, image for image and augmentation for augmentation, what one process of batch 4 sees,
    and DDP's average of their gradients is the gradient of the batch of 4."""
    def argv(out, batch_size):
        return ["finetune", "--checkpoint", str(mae_checkpoint), "--data_path", str(tiny_folder), "--num_workers", "0",
                "--batch_size", str(batch_size), "--epochs", "2", "--warmup_epochs", "1", "--drop_path", "0",
                "--device", "cpu", "--output_dir", str(out)]

    assert fastmae_main(argv(tmp_path / "one", 4)) == 0
    run_on_ranks(argv(tmp_path / "two", 2), 2, tmp_path, "finetune")
    one, two = weights(tmp_path / "one" / "checkpoint-last.pth"), weights(tmp_path / "two" / "checkpoint-last.pth")
    start = weights(mae_checkpoint)
    assert not torch.equal(two["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])  # it trained
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-6, msg=name)
    logs = {name: [r for r in read_jsonl(tmp_path / name / "log.jsonl") if not r.get("final")]
            for name in ("one", "two")}
    for a, b in zip(logs["one"], logs["two"]):
        assert a["val_top1"] == b["val_top1"] and a["lr"] == pytest.approx(b["lr"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)  # both processes' batches
    final = read_jsonl(tmp_path / "two" / "log.jsonl")[-1]
    assert final["final"] and final["n"] == 8  # the 8 val images, split between the processes, counted once
    assert len((tmp_path / "two" / "log.txt").read_text().splitlines()) == 2  # one process writes


def evaluate_saved_probe(path, data_path) -> dict:
    """The saved probe's val top-1 and loss, in this process."""
    import argparse

    from fastmae.downstream.classify import datasets_and_loaders, evaluate
    from fastmae.downstream.linprobe import make_linear_probe
    from fastmae.downstream.vit_classifier import create_classifier

    model = make_linear_probe(create_classifier("vit_micro_patch4", 2, img_size=32))
    model.load_state_dict(weights(path))
    args = argparse.Namespace(data_path=str(data_path), batch_size=4, accum_iter=1, num_workers=0, seed=0,
                              pin_mem=False)
    return evaluate(model, datasets_and_loaders(args, 32, False)[3], torch.device("cpu"))


@pytest.mark.parametrize("cache", [True, False])
def test_linprobe_on_two_processes_logs_what_the_saved_probe_scores(cache, tiny_folder, mae_checkpoint, tmp_path):
    """Each process computes half the features and gathers the rest (--cache_features). The evaluation
    split between the processes is the saved probe's: the first process's BatchNorm statistics, which
    DDP leaves behind in the others after an epoch's last batch."""
    out = tmp_path / "probe"
    run_on_ranks(["linprobe", "--checkpoint", str(mae_checkpoint), "--epochs", "2", "--warmup_epochs", "1",
                  "--data_path", str(tiny_folder), "--num_workers", "0", "--batch_size", "2", "--device", "cpu",
                  "--output_dir", str(out), *(["--cache_features"] if cache else [])], 2, tmp_path, "linprobe")
    log = read_jsonl(out / "log.jsonl")
    assert [r["epoch"] for r in log[:2]] == [1, 2] and log[-1]["final"] and log[-1]["n"] == 8
    saved = torch.load(out / "checkpoint-linprobe.pth", weights_only=True)
    assert saved["model"]["head.0.num_batches_tracked"] == 2 * 3  # 2 epochs of 6 images per process
    stats = evaluate_saved_probe(out / "checkpoint-linprobe.pth", tiny_folder)
    assert stats["top1"] == log[1]["val_top1"] and stats["loss"] == pytest.approx(log[1]["val_loss"], rel=1e-6)


def test_linprobe_on_more_processes_than_val_images(tiny_folder, mae_checkpoint, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_folder / "train", data / "train")
    for name in ("cat", "dog"):  # 2 val images: the third process's share is empty
        (data / "val" / name).mkdir(parents=True)
        shutil.copy(tiny_folder / "val" / name / "0.png", data / "val" / name)
    run_on_ranks(["linprobe", "--checkpoint", str(mae_checkpoint), "--epochs", "1", "--warmup_epochs", "1",
                  "--data_path", str(data), "--num_workers", "0", "--batch_size", "2", "--device", "cpu",
                  "--cache_features", "--output_dir", str(tmp_path / "probe")], 3, tmp_path, "two_val")
    assert read_jsonl(tmp_path / "probe" / "log.jsonl")[-1]["n"] == 2


@pytest.mark.parametrize("command,flags", [
    ("finetune", ["--mixup", "0.8", "--cutmix", "1.0", "--drop_path", "0.2", "--num_workers", "2"]),
    ("linprobe", ["--num_workers", "0"]),
])
def test_a_resumed_run_repeats_the_epochs_of_a_run_never_stopped(command, flags, tiny_folder, mae_checkpoint, tmp_path,
                                                                 monkeypatch):
    """The order, the augmentation (RandAugment and random erasing in finetune), drop path and mixup of
    an epoch come from the seed and the epoch alone, whether the loader's workers are new or not."""
    name = "checkpoint-last.pth" if command == "finetune" else "checkpoint-linprobe.pth"

    def run(out, *extra):
        return fastmae_main([command, "--checkpoint", str(mae_checkpoint), "--data_path", str(tiny_folder),
                             "--batch_size", "4", "--warmup_epochs", "1", "--epochs", "3", "--device", "cpu",
                             "--output_dir", str(out), *flags, *extra])

    class Stopped(Exception):
        pass

    logged = EpochLogs.epoch

    def stop_after_the_second_epoch(self, epoch, *args):
        logged(self, epoch, *args)  # after the epoch's checkpoint
        if epoch == 1:
            raise Stopped

    assert run(tmp_path / "straight") == 0
    with monkeypatch.context() as patch:
        patch.setattr(EpochLogs, "epoch", stop_after_the_second_epoch)
        with pytest.raises(Stopped):
            run(tmp_path / "stopped")
    assert run(tmp_path / "stopped", "--resume", "auto") == 0
    straight, resumed = weights(tmp_path / "straight" / name), weights(tmp_path / "stopped" / name)
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key
    losses = [[r["train_loss"] for r in read_jsonl(tmp_path / run_name / "log.jsonl") if not r.get("final")]
              for run_name in ("straight", "stopped")]
    assert losses[0] == losses[1]


def test_a_requeued_finetune_stopped_before_its_first_last_checkpoint_starts_afresh(tiny_folder, mae_checkpoint,
                                                                                   tmp_path, monkeypatch, capsys):
    """Stopped between epoch 0's checkpoint-best.pth and checkpoint-last.pth: --resume auto (the same
    command, requeued) has nothing to continue, so it starts afresh; what the stopped start wrote is
    kept aside, not refused forever nor written over."""
    import fastmae.downstream.finetune as finetune

    out = tmp_path / "ft"
    argv = ["finetune", "--checkpoint", str(mae_checkpoint), "--data_path", str(tiny_folder), "--num_workers", "0",
            "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--device", "cpu", "--output_dir", str(out),
            "--resume", "auto"]

    class Stopped(Exception):
        pass

    saved = finetune.save_checkpoint

    def stop_at_the_first_last(path, *args, **kwargs):
        if path.name == "checkpoint-last.pth":
            raise Stopped
        return saved(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(finetune, "save_checkpoint", stop_at_the_first_last)
        with pytest.raises(Stopped):
            fastmae_main(argv)
    best = (out / "checkpoint-best.pth").read_bytes()
    capsys.readouterr()
    assert fastmae_main(argv) == 0
    printed = capsys.readouterr().out
    assert "no checkpoint-last.pth in" in printed
    assert "checkpoint-best.pth is kept as checkpoint-best.restarted.pth" in printed
    assert (out / "checkpoint-best.restarted.pth").read_bytes() == best
    assert [r["epoch"] for r in read_jsonl(out / "log.jsonl") if not r.get("final")] == [1, 2]


def test_a_linear_probe_batch_of_one_image_is_refused_up_front(tiny_folder, mae_checkpoint, capsys):
    argv = ["linprobe", "--checkpoint", str(mae_checkpoint), "--data_path", str(tiny_folder), "--num_workers", "0",
            "--epochs", "1", "--device", "cpu", "--batch_size", "1"]
    assert fastmae_main(argv) == 2
    assert ("the probe's BatchNorm needs at least 2 images in a batch, and a batch here holds 1 (12 train images "
            "over 1 process(es), --batch_size 1)") in capsys.readouterr().err
