"""Distributed data parallel on CPU (gloo): 2 ranks equal 1 rank with the same global batch, and
`torchrun -m fastmae pretrain` runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from fastmae.models import create_model
from fastmae.train.distributed import join_process_group
from fastmae.train.optim import build_optimizer
from fastmae.train.trainer import train_step

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8


def one_step(model, imgs, noise, micro_batches: int) -> None:
    """One optimizer step on imgs [B,3,32,32] with noise [B,64], split into ``micro_batches``."""
    optimizer = build_optimizer(getattr(model, "module", model), lr=1e-2, weight_decay=0.05)
    # Adam's first update is about lr * g / (|g| + eps): for gradients that are exactly zero in
    # theory (the key bias under softmax) it turns round-off into updates of size lr. A larger eps
    # keeps the comparison about the gradients the ranks agreed on, not about amplified round-off.
    for group in optimizer.param_groups:
        group["eps"] = 1e-4
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    chunks = list(zip(imgs.chunk(micro_batches), noise.chunk(micro_batches)))
    train_step(model, optimizer, scaler, chunks, mask_ratio=0.75, autocast_dtype=None)


def _rank_worker(rank: int, world_size: int, init_file: str, imgs, noise, out_path: str) -> None:
    torch.set_num_threads(1)
    join_process_group("gloo", f"file://{init_file}", rank, world_size)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(create_model("mae_vit_micro_patch4"))
        share = imgs.shape[0] // world_size
        mine = slice(rank * share, (rank + 1) * share)
        one_step(model, imgs[mine], noise[mine], micro_batches=2)  # accumulation across 2 micro-batches too
        if rank == 0:
            torch.save(model.module.state_dict(), out_path)
        # both ranks leave together (rank 0 saves first); join_process_group is what keeps a finished
        # rank from aborting at exit ("terminate called without an active exception" on CI)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_one_step_on_two_ranks_equals_one_step_on_one_rank(tmp_path):
    generator = torch.Generator().manual_seed(1)
    imgs = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)
    noise = torch.rand(GLOBAL_BATCH, 64, generator=generator)
    out = tmp_path / "ddp.pth"
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "rendezvous"), imgs, noise, str(out)), nprocs=2, join=True)

    torch.manual_seed(0)
    single = create_model("mae_vit_micro_patch4")
    initial = {k: v.clone() for k, v in single.state_dict().items()}
    one_step(single, imgs, noise, micro_batches=1)
    ddp_state = torch.load(out, weights_only=True)
    changed = 0
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(value, initial[name])
    assert changed > 10  # the step did move the weights


# fastmae pretrain under torchrun, the first rank's checkpoint of step 1 failing part-way, as on a disk
# that fills up (beneath torch.save, which reports it as its own RuntimeError)
REFUSE_FIRST_SAVE = f"""
import os
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import pytest
from full_disk import refuse_writes
from fastmae.cli import main
from gloo_threads import gloo_threads

refuse_writes(pytest.MonkeyPatch(), ["checkpoint-step00000001.pth"])
status = main(["pretrain", *sys.argv[1:]])
# one write: the ranks share torchrun's stdout, and print's pieces of two ranks interleave
os.write(1, f"rank {{os.environ['RANK']}}: gloo threads left: {{gloo_threads()}}\\n".encode())
sys.exit(status)
"""


@pytest.fixture
def image_folder(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(32):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(data / f"{i}.png")
    return data


def test_torchrun_two_cpu_processes(tmp_path, image_folder):
    """Two ranks train, rank 0 alone logs and saves; when its save of step 1 fails, both ranks go on
    (neither waits for the other at the save) and step 2 is saved."""
    data = image_folder
    out = tmp_path / "out"
    script = tmp_path / "pretrain_refusing_the_first_save.py"
    script.write_text(REFUSE_FIRST_SAVE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               "--data_path", str(data), "--output_dir", str(out),
               "--model", "mae_vit_micro_patch4", "--input_size", "32", "--batch_size", "4", "--accum_iter", "2",
               "--num_workers", "0", "--max_steps", "2", "--log_every", "1", "--save_every", "1",
               "--device", "cpu"]  # with the bar: rank 0 only
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cpu x 2 rank(s)" in result.stdout and "effective batch 16 = 4 x accum 2 x 2" in result.stdout
    assert "4 batches of 4 per epoch per rank" in result.stdout  # each rank reads its half of the 32 images
    assert result.stdout.count("could not save the checkpoint of step 1") == 1, result.stdout  # rank 0 says it
    # both ranks tore their process groups down in full: no gloo thread is left to abort the exit
    assert "rank 0: gloo threads left: []" in result.stdout and "rank 1: gloo threads left: []" in result.stdout, \
        result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # rank 0 alone logs
    assert sorted(p.name for p in out.glob("checkpoint-step*.pth")) == ["checkpoint-step00000002.pth"]


# fastmae pretrain under torchrun, the second rank running out of device memory in step 2
SECOND_RANK_RUNS_OUT_OF_MEMORY = """
import os, sys, torch
import fastmae.train.trainer as trainer_module
from fastmae.cli import main

real_step, calls = trainer_module.train_step, []

def train_step(*args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
    return real_step(*args, **kwargs)

trainer_module.train_step = train_step
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


def test_one_rank_out_of_memory_ends_the_run_with_its_message_and_no_hang(tmp_path, image_folder):
    script = tmp_path / "pretrain_out_of_memory_on_rank_1.py"
    script.write_text(SECOND_RANK_RUNS_OUT_OF_MEMORY)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               "--data_path", str(image_folder), "--output_dir", str(tmp_path / "out"), "--model",
               "mae_vit_micro_patch4", "--input_size", "32", "--batch_size", "4", "--num_workers", "0",
               "--max_steps", "4", "--device", "cpu", "--no_progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "stopping: out of cpu memory in optimizer step 2 with --batch_size 4 per rank" in result.stderr, result.stderr


def _any_rank_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    from fastmae.train.distributed import DistributedContext

    join_process_group("gloo", f"file://{init_file}", rank, world_size)
    try:
        ctx = DistributedContext(rank=rank, world_size=world_size, host_group=dist.group.WORLD)
        answers = [ctx.any_rank(rank == 1), ctx.any_rank(False), ctx.any_rank(True)]
        Path(out_dir, f"{rank}.json").write_text(json.dumps(answers))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_stop_requested_on_one_rank_stops_every_rank(tmp_path):
    """SIGTERM reaches one rank: every rank must agree to save and stop, or the others hang in the next all-reduce."""
    mp.spawn(_any_rank_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)] == [[True, False, True]] * 2


def micro_run(image_folder, out, *extra):
    return ["--data_path", str(image_folder), "--output_dir", str(out), "--model", "mae_vit_micro_patch4",
            "--input_size", "32", "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--no_progress",
            *extra]


def torchrun(script: Path, argv: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# each rank in a folder of its own, as on nodes whose --output_dir is on their own disk
RANK_IN_ITS_OWN_FOLDER = """
import os, sys
os.chdir(sys.argv[1] + os.environ["RANK"])
from fastmae.cli import main
sys.exit(main(["pretrain", *sys.argv[2:]]))
"""


def test_resume_auto_over_folders_the_ranks_see_differently_stops_every_rank_with_the_reason(tmp_path, image_folder):
    """Rank 0 found the checkpoint and resumed at step 2, rank 1 found none and started at step 0: the two
    trained on, out of step, and hung in gloo at the first save."""
    from fastmae.cli import main

    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    assert main(["pretrain", *micro_run(image_folder, tmp_path / "node0" / "out", "--max_steps", "2")]) == 0
    script = tmp_path / "rank_in_its_own_folder.py"
    script.write_text(RANK_IN_ITS_OWN_FOLDER)
    result = torchrun(script, [str(tmp_path / "node"), *micro_run(image_folder, "out", "--max_steps", "4",
                                                                  "--resume", "auto")])
    assert result.returncode != 0
    for this_one in ("this one does", "this one does not"):
        assert (f"--resume out/checkpoint-step00000002.pth: not every process of the run sees this file ({this_one}): "
                "give --output_dir (and --resume) a folder every node shares") in result.stderr, result.stderr


# SIGTERM (a job's time limit) reaching the second rank as it waits for the first at the end of the run
TERMINATED_WAITING_AT_THE_END = """
import os, signal, sys, time
from fastmae.train.distributed import DistributedContext
from fastmae.cli import main

real_barrier = DistributedContext.barrier

def terminated_waiting(self):
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the handler runs here
    real_barrier(self)

DistributedContext.barrier = terminated_waiting
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


def test_a_sigterm_after_the_last_step_ends_a_finished_run_cleanly(tmp_path, image_folder):
    """The second rank waited for the first's figures under the default SIGTERM action: it died there, the
    first then failed its barrier, and a finished run exited 1 with a gloo traceback."""
    script = tmp_path / "terminated_waiting_at_the_end.py"
    script.write_text(TERMINATED_WAITING_AT_THE_END)
    result = torchrun(script, micro_run(image_folder, tmp_path / "out", "--max_steps", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done at step 2" in result.stdout and "Traceback" not in result.stderr
