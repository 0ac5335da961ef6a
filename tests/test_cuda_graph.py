"""The training step replayed as a CUDA graph (fastmae.train.cuda_graph).

On CPU a stand-in runner executes the captured body at each replay, as a graph replays its kernels, so
the step's bookkeeping is checked against the trainer's eager ``train_step``: warm-up steps, capture,
static buffers, the learning rate reaching replays, the gradients a replay starts from. On CUDA the
real graph is checked against the eager step, and ``fastmae pretrain --cuda_graph`` end to end.
"""

from __future__ import annotations

import argparse

import contextlib
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from fastmae.checkpoint import optimizer_state
from fastmae.compiling import CompileConfig
from fastmae.models import create_model
from fastmae.train.cuda_graph import (GraphedTrainStep, check_cuda_graph_support, make_optimizer_capturable,
                                      use_cuda_graph)
from fastmae.train.distributed import join_process_group
from fastmae.train.optim import build_optimizer
from fastmae.train.schedule import set_lr
from fastmae.train.trainer import train_step

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class EagerReplayRunner:
    """A CudaGraphRunner stand-in: capture records the body without running it (as CUDA's capture
    runs nothing) and returns the memory a replay rewrites; each replay runs the body. A graph captured
    while the gradients were None created them in its own memory, and its replays overwrite them: such
    a replay starts from no gradients."""

    def __init__(self, model=None):
        self.model = model  # None: no capture may create the gradients (they exist, as flat gradients)
        self.graphs = []  # (body, output, whether the capture created the gradients)
        self.warmups = 0
        self.replays = []

    @contextlib.contextmanager
    def warmup(self, *inputs):
        self.warmups += 1
        yield

    def capture(self, body):
        creates_grads = self.model is not None and all(p.grad is None for p in self.model.parameters())
        assert self.model is not None or not creates_grads
        out = torch.zeros(())
        self.graphs.append((body, out, creates_grads))
        return len(self.graphs) - 1, out

    def replay(self, graph):
        body, out, creates_grads = self.graphs[graph]
        if creates_grads:
            for p in self.model.parameters():
                p.grad = None
        self.replays.append(graph)
        result = body()
        if result is not None:
            out.copy_(result)


def micro_model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = create_model("mae_vit_micro_patch4", kernels="torch")
    return model, build_optimizer(model, lr=1e-3, weight_decay=0.05)


def batches(count, batch=4, size=32, patches=64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=generator), torch.rand(batch, patches, generator=generator))
            for _ in range(count)]


def eager_and_graphed(accum_iter):
    """Two equal micro models: one for ``train_step``, one stepped by a GraphedTrainStep (2 warm-up steps,
    the stand-in runner). -> (eager model, its optimizer, graphed model, its optimizer, runner, step)."""
    eager_model, eager_opt = micro_model_and_optimizer()
    # the same AdamW arithmetic on both sides (a tensor lr rounds it to fp32; Adam amplifies that on the
    # key biases, whose gradient is zero up to round-off): what differs is how the step is run
    make_optimizer_capturable(eager_opt, CPU)
    graph_model, graph_opt = micro_model_and_optimizer()
    runner = EagerReplayRunner(graph_model)
    step = GraphedTrainStep(graph_model, graph_opt, 0.75, None, accum_iter, warmup_steps=2, runner=runner)
    return eager_model, eager_opt, graph_model, graph_opt, runner, step


@pytest.mark.parametrize("accum_iter", [1, 3])
def test_replayed_steps_compute_what_the_eager_step_computes(accum_iter):
    eager_model, eager_opt, graph_model, graph_opt, runner, step = eager_and_graphed(accum_iter)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    lrs = [1e-3, 2e-3, 5e-4, 0.0, 3e-3, 1e-3]
    data = batches(len(lrs) * accum_iter)
    for index, lr in enumerate(lrs):
        micro_batches = data[index * accum_iter:(index + 1) * accum_iter]
        set_lr(eager_opt, lr)
        set_lr(graph_opt, lr)
        want = train_step(eager_model, eager_opt, scaler, micro_batches, 0.75, None)
        got = step([(imgs.clone(), noise.clone()) for imgs, noise in micro_batches])
        assert got.shape == (accum_iter,)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=f"step {index}")
        assert step.captured == (index >= 2)
    assert runner.warmups == 2
    if accum_iter == 1:  # one graph, which creates the gradients (backward writes them, nothing to zero)
        assert runner.replays == [0] * 4 and runner.graphs[0][2]
    else:  # forward + backward per micro-batch into gradients that exist, then the update
        assert runner.replays == ([0] * accum_iter + [1]) * 4 and not runner.graphs[0][2]
    for (name, a), b in zip(eager_model.named_parameters(), graph_model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_steps_with_fewer_micro_batches_average_over_the_ones_they_have():
    """The last step of an epoch accumulates what is left (``train_step`` divides by that count): the
    replays scale each micro-batch's loss through a device tensor, the same graphs serving every count."""
    counts = [3, 1, 3, 2, 3, 1]  # warm-up steps of 3 and 1; the capture; then 2, 3 and 1
    eager_model, eager_opt, graph_model, _, runner, step = eager_and_graphed(accum_iter=3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    data = iter(batches(sum(counts)))
    for index, count in enumerate(counts):
        micro_batches = [next(data) for _ in range(count)]
        want = train_step(eager_model, eager_opt, scaler, micro_batches, 0.75, None)
        got = step(micro_batches)
        assert got.shape == (count,)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"step {index}")
    assert runner.replays == [0, 0, 0, 1] + [0, 0, 1] + [0, 0, 0, 1] + [0, 1]
    for (name, a), b in zip(eager_model.named_parameters(), graph_model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match=r"takes 1 to 3 micro-batches per step \(--accum_iter 3\), got 4"):
        step(batches(4))
    with pytest.raises(ValueError, match="got 0"):
        step([])


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str, counts: list[int]) -> None:
    """Each rank steps a DDP model eagerly (``train_step``) and a graphed step averaging flat gradients,
    on its own micro-batches; saves both models and both steps' losses."""
    torch.set_num_threads(1)
    join_process_group("gloo", f"file://{init_file}", rank, world_size)
    try:
        eager_model, eager_opt = micro_model_and_optimizer(seed=0)
        make_optimizer_capturable(eager_opt, CPU)  # the same AdamW arithmetic (see the single-process test)
        ddp = DistributedDataParallel(eager_model, gradient_as_bucket_view=True)
        # another start on each rank: the graphed step starts every rank from rank 0's weights, as DDP does
        graph_model, graph_opt = micro_model_and_optimizer(seed=rank)
        step = GraphedTrainStep(graph_model, graph_opt, 0.75, None, max(counts), warmup_steps=2,
                                runner=EagerReplayRunner(), process_group=dist.group.WORLD)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        data = iter(batches(sum(counts), seed=10 + rank))  # each rank its own images and masks
        eager_losses, graph_losses = [], []
        for count in counts:
            micro_batches = [next(data) for _ in range(count)]
            eager_losses.append(train_step(ddp, eager_opt, scaler, micro_batches, 0.75, None))
            graph_losses.append(step(micro_batches))
        torch.save({"eager": eager_model.state_dict(), "graph": graph_model.state_dict(),
                    "eager_losses": eager_losses, "graph_losses": graph_losses}, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()  # ranks leave together (see tests/test_train_ddp.py)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("accum_iter", [1, 2])
def test_graphed_steps_on_two_ranks_average_the_gradients_as_ddp_does(tmp_path, accum_iter):
    counts = [accum_iter] * 4 + ([1] if accum_iter > 1 else [])  # the last step of an epoch: what is left
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path), counts), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    torch.manual_seed(0)
    initial = create_model("mae_vit_micro_patch4", kernels="torch").state_dict()
    for rank, saved in enumerate(ranks):
        for eager, graph in zip(saved["eager_losses"], saved["graph_losses"]):
            torch.testing.assert_close(graph, eager, rtol=0, atol=0, msg=f"rank {rank} losses")
        for name, value in saved["eager"].items():
            # DDP's mean over 2 ranks (halve, then add) is exact in either order: the same bits
            torch.testing.assert_close(saved["graph"][name], value, rtol=0, atol=0, msg=f"rank {rank} {name}")
            torch.testing.assert_close(ranks[0]["graph"][name], saved["graph"][name], rtol=0, atol=0,
                                       msg=f"{name}: the ranks' replicas differ")
    assert sum(not torch.equal(ranks[0]["graph"][k], v) for k, v in initial.items()) > 10  # the steps moved them
    assert not torch.equal(ranks[0]["graph_losses"][0], ranks[1]["graph_losses"][0])  # the ranks saw other data


def _pretrain_worker(rank: int, world_size: int, init_file: str, flags: list[str]) -> None:
    import fastmae.train.cuda_graph as cuda_graph
    from fastmae.cli import main as fastmae_main

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    if "--cuda_graph" in flags:  # on CPU: the stand-in runner, and the CPU device let through
        cuda_graph.check_cuda_graph_support = lambda *args: None
        cuda_graph.CudaGraphRunner = lambda device: EagerReplayRunner()
    assert fastmae_main(flags + ["--dist_url", f"file://{init_file}"]) == 0


def test_pretrain_with_cuda_graph_on_two_ranks_trains_as_ddp_does(tmp_path):
    """``fastmae pretrain --cuda_graph`` in two processes: the graphed step, not DDP, averages the
    gradients, epoch after epoch, the batch left after each epoch's last whole step skipped by both
    (stand-in runner on CPU)."""
    from fastmae.data.synthetic import write_jpeg_folder
    from fastmae.train.checkpoints import latest_checkpoint

    jpegs = tmp_path / "jpegs"
    write_jpeg_folder(jpegs, 20, size=(48, 40), num_classes=2)  # 5 batches of 2 per rank: 2 steps of 2 an epoch
    runs = {}
    for name, extra in (("ddp", []), ("graphed", ["--cuda_graph"])):
        out = tmp_path / name
        flags = ["pretrain", "--data_path", str(jpegs), "--output_dir", str(out), "--model", "mae_vit_micro_patch4",
                 "--input_size", "32", "--batch_size", "2", "--accum_iter", "2", "--num_workers", "0",
                 "--epochs", "3", "--warmup_epochs", "1", "--blr", "2e-3", "--max_steps", "6", "--log_every", "1",
                 "--no_progress", "--device", "cpu", *extra]  # 3 warm-up steps, the capture, 2 replays
        mp.spawn(_pretrain_worker, args=(2, str(tmp_path / f"rendezvous_{name}"), flags), nprocs=2, join=True)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (records, torch.load(latest_checkpoint(out), weights_only=False)["model"],
                      json.loads((out / "summary.json").read_text()))
    (ddp_records, ddp_weights, _), (records, weights, summary) = runs["ddp"], runs["graphed"]
    assert summary["cuda_graph"] and summary["world_size"] == 2
    assert [r["step"] for r in records] == list(range(1, 7)) and records[-1]["epoch"] == 3  # 3 epochs of 2 steps
    torch.testing.assert_close([r["loss"] for r in records], [r["loss"] for r in ddp_records], rtol=1e-5, atol=0)
    for name, value in ddp_weights.items():
        # the lr as an fp32 tensor in the graphed step's AdamW, a float in DDP's: round-off apart
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_replay_reads_the_new_batch_and_the_lr_from_the_device_tensor():
    model, optimizer = micro_model_and_optimizer()
    step = GraphedTrainStep(model, optimizer, 0.75, None, warmup_steps=1, runner=EagerReplayRunner(model))
    (imgs, noise), (imgs2, noise2) = batches(2)
    step([(imgs, noise)])
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and all(g["capturable"] for g in optimizer.param_groups)
    set_lr(optimizer, 0.0)
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == 0.0  # filled in place: the replay sees it
    before = [p.detach().clone() for p in model.parameters()]
    first = step([(imgs, noise)])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # lr 0: no update
    second = step([(imgs2, noise2)])
    assert not torch.equal(first, second)  # the new batch was copied into the static buffer
    set_lr(optimizer, 1e-2)
    step([(imgs2, noise2)])
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_batch_of_another_shape_is_an_error_naming_both_shapes():
    model, optimizer = micro_model_and_optimizer()
    step = GraphedTrainStep(model, optimizer, 0.75, None, warmup_steps=1, runner=EagerReplayRunner(model))
    (imgs, noise), = batches(1)
    step([(imgs, noise)])
    step([(imgs, noise)])
    with pytest.raises(ValueError, match=r"captured for the batch of shape \[4, 3, 32, 32\].*got \[2, 3, 32, 32\]"):
        step([(imgs[:2], noise[:2])])
    with pytest.raises(ValueError, match="masking noise"):
        step([(imgs, noise.double())])
    with pytest.raises(ValueError, match=r"takes 1 to 1 micro-batches per step \(--accum_iter 1\), got 2"):
        step([(imgs, noise)] * 2)


def test_noise_is_drawn_when_not_given():
    model, optimizer = micro_model_and_optimizer()
    step = GraphedTrainStep(model, optimizer, 0.75, None, warmup_steps=1, runner=EagerReplayRunner(model))
    set_lr(optimizer, 0.0)  # no update: a loss that changes comes from a new mask
    (imgs, _), = batches(1)
    losses = [step([(imgs, None)]).item() for _ in range(3)]  # a warm-up step, the capture, a replay
    assert len(set(losses)) == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(device=CPU), "needs a CUDA device"),
    (dict(precision="fp16"), "GradScaler"),
    (dict(compiled=CompileConfig()), "reduce-overhead"),
])
def test_settings_a_replay_cannot_honour_are_named(kwargs, message):
    settings = dict(device=torch.device("cuda"), precision="bf16", compiled=None)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        check_cuda_graph_support(**settings)


def test_auto_replays_where_the_route_was_measured_and_on_is_checked():
    """auto (the default): one process on CUDA, bf16/fp32, no --compile, PyTorch's attention; else eager.
    on (or True) raises where a replay cannot honour a setting; off (or False) never replays."""
    cuda = torch.device("cuda")
    plain = dict(device=cuda, precision="bf16", compiled=None, attn="sdpa", processes=1)
    assert use_cuda_graph("auto", **plain) and use_cuda_graph("auto", **{**plain, "precision": "fp32"})
    for other in (dict(device=CPU), dict(precision="fp16"), dict(compiled=CompileConfig()), dict(attn="xformers"),
                  dict(processes=2)):
        assert not use_cuda_graph("auto", **{**plain, **other}), other
    assert use_cuda_graph("on", **{**plain, "processes": 2}) and use_cuda_graph(True, **plain)
    assert not use_cuda_graph("off", **plain) and not use_cuda_graph(False, **plain)
    with pytest.raises(ValueError, match="GradScaler"):
        use_cuda_graph("on", **{**plain, "precision": "fp16"})
    with pytest.raises(ValueError, match="must be one of auto, on, off"):
        use_cuda_graph("yes", **plain)
    from fastmae.train.config import PretrainConfig

    with pytest.raises(ValueError, match="--cuda_graph must be one of auto, on, off, got 'yes'"):
        PretrainConfig(cuda_graph="yes")
    assert PretrainConfig(cuda_graph=True).cuda_graph is True


def test_out_of_memory_under_a_replayed_step_says_it_can_run_eagerly():
    from types import SimpleNamespace

    from fastmae.train.trainer import Pretrainer

    run = SimpleNamespace(last_checkpoint=None, graphed_step=object(), device=torch.device("cuda"),
                          position=SimpleNamespace(step=4), cfg=SimpleNamespace(batch_size=256), effective_batch=256,
                          _saved_so_far=lambda: "no checkpoint of this run is saved yet")
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "stays the same; or run the step eagerly with --cuda_graph off; no checkpoint" in \
        Pretrainer._out_of_memory_message(run, error)
    run.graphed_step = None
    assert "--cuda_graph" not in Pretrainer._out_of_memory_message(run, error)


def test_pretrain_cuda_graph_flag_takes_a_choice_and_alone_means_on():
    from fastmae.train.pretrain import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).cuda_graph == "auto"
    assert parser.parse_args(["--cuda_graph"]).cuda_graph == "on"
    assert parser.parse_args(["--cuda_graph", "off"]).cuda_graph == "off"


def test_a_model_off_cuda_without_a_runner_is_an_error():
    model, optimizer = micro_model_and_optimizer()
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        GraphedTrainStep(model, optimizer, 0.75, None)
    with pytest.raises(ValueError, match="at least one eager warm-up step"):
        GraphedTrainStep(model, optimizer, 0.75, None, warmup_steps=0, runner=EagerReplayRunner(model))
    with pytest.raises(ValueError, match="accum_iter must be positive"):
        GraphedTrainStep(model, optimizer, 0.75, None, accum_iter=0, runner=EagerReplayRunner(model))


def test_checkpoints_hold_the_lr_as_a_float_and_load_back_into_an_eager_optimizer():
    model, optimizer = micro_model_and_optimizer()
    make_optimizer_capturable(optimizer, CPU)
    set_lr(optimizer, 2.5e-4)
    state = optimizer_state(optimizer)
    assert all(type(g["lr"]) is float and g["lr"] == pytest.approx(2.5e-4) for g in state["param_groups"])
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)  # the live optimizer keeps its tensor
    _, eager_optimizer = micro_model_and_optimizer()
    eager_optimizer.load_state_dict(state)
    set_lr(eager_optimizer, 1e-3)
    assert eager_optimizer.param_groups[0]["lr"] == 1e-3


def test_pretrain_cuda_graph_on_cpu_is_a_message_and_exit_2(tmp_path, capsys):
    from fastmae.cli import main as fastmae_main

    out = tmp_path / "out"
    assert fastmae_main(["pretrain", "--cuda_graph", "--device", "cpu", "--output_dir", str(out), "--max_steps", "1",
                         "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "fastmae pretrain: error:" in err and "--cuda_graph" in err and "CUDA device" in err
    assert not (out / "metrics.jsonl").exists()


def test_bench_step_refuses_cuda_graph_contenders_on_cpu(capsys):
    from fastmae.cli import main as fastmae_main

    assert fastmae_main(["bench", "step", "--impl", "fastmae+cudagraph", "--device", "cpu"]) == 2
    assert "need a CUDA device" in capsys.readouterr().err


# ---- on CUDA ----

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernels, dtype, accum_iter", [("torch", None, 1), ("auto", torch.bfloat16, 1),
                                                       ("auto", torch.bfloat16, 2)],
                         ids=["torch-fp32", "triton-bf16", "triton-bf16-accum2"])
def test_cuda_graph_replays_match_the_eager_step(kernels, dtype, accum_iter):
    device = torch.device("cuda")
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_model("mae_vit_micro_patch4", kernels=kernels, attn="math").to(device)
        models.append((model, build_optimizer(model, lr=1e-3, weight_decay=0.05)))
    (eager_model, eager_opt), (graph_model, graph_opt) = models
    make_optimizer_capturable(eager_opt, device)  # the same AdamW arithmetic: what differs is the replay
    step = GraphedTrainStep(graph_model, graph_opt, 0.75, dtype, accum_iter, warmup_steps=2)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    data = [(imgs.to(device), noise.to(device)) for imgs, noise in batches(6 * accum_iter)]
    for index in range(6):
        micro_batches = data[index * accum_iter:(index + 1) * accum_iter]
        lr = 1e-3 * (index + 1)
        set_lr(eager_opt, lr)
        set_lr(graph_opt, lr)
        want = train_step(eager_model, eager_opt, scaler, micro_batches, 0.75, dtype)
        got = step(micro_batches)
        torch.testing.assert_close(got, want, rtol=2e-3 if dtype else 1e-5, atol=1e-5, msg=f"step {index}")
    assert step.captured
    for (name, a), b in zip(eager_model.named_parameters(), graph_model.parameters()):
        if name.endswith("attn.qkv.bias"):
            # the key bias's gradient is zero up to round-off, which AdamW turns into lr-sized steps of
            # either sign: any difference in summation order (atomics, another cuBLAS algorithm on the
            # capture stream) moves it by up to the summed lr. The query and value biases are compared.
            width = a.shape[0] // 3
            a, b = torch.cat([a[:width], a[2 * width:]]), torch.cat([b[:width], b[2 * width:]])
        torch.testing.assert_close(b, a, rtol=2e-2 if dtype else 1e-4, atol=2e-3 if dtype else 1e-5, msg=name)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replays_with_an_nccl_all_reduce_match_ddp(tmp_path):
    """The multi-process route on one GPU: NCCL with one rank, its all-reduce launched between the
    replays of forward + backward and of the update, against DDP's eager step; no host wait."""
    device = torch.device("cuda", torch.cuda.current_device())
    join_process_group("nccl", f"file://{tmp_path / 'rendezvous'}", 0, 1, device_id=device)
    try:
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            model = create_model("mae_vit_micro_patch4", kernels="auto", attn="math").to(device)
            models.append((model, build_optimizer(model, lr=1e-3, weight_decay=0.05)))
        (eager_model, eager_opt), (graph_model, graph_opt) = models
        make_optimizer_capturable(eager_opt, device)
        ddp = DistributedDataParallel(eager_model, device_ids=[device.index], gradient_as_bucket_view=True)
        step = GraphedTrainStep(graph_model, graph_opt, 0.75, torch.bfloat16, 2, warmup_steps=2,
                                process_group=dist.group.WORLD)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        data = iter([(imgs.to(device), noise.to(device)) for imgs, noise in batches(11)])
        for index, count in enumerate([2, 2, 2, 1, 2, 2]):  # warm-up, warm-up, the capture, a partial step
            micro_batches = [next(data) for _ in range(count)]
            want = train_step(ddp, eager_opt, scaler, micro_batches, 0.75, torch.bfloat16)
            if step.captured:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                got = step(micro_batches)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-5, msg=f"step {index}")
        assert step.captured
        for (name, a), b in zip(eager_model.named_parameters(), graph_model.parameters()):
            torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@needs_cuda
def test_a_replayed_step_does_not_wait_for_the_gpu():
    device = torch.device("cuda")
    model = create_model("mae_vit_micro_patch4").to(device)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    step = GraphedTrainStep(model, optimizer, 0.75, torch.bfloat16, warmup_steps=1)
    data = [(imgs.to(device), noise.to(device)) for imgs, noise in batches(4)]
    step([data[0]])
    step([data[1]])  # the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step([pair]) for pair in data[2:]]
        set_lr(optimizer, 5e-4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss).item() for loss in losses)


@pytest.mark.gpu
@needs_cuda
# 1: 4 batches per epoch, so the 5 steps cross an epoch boundary; 3: 7 batches per epoch make two steps of 3
# micro-batches, and the batch left over is read and dropped (as on the eager path) between two replays. (Each
# run's 5 steps fall at 5 different learning rates: 2 batches per epoch would put epochs 0.5 and 2.0 at the same.)
@pytest.mark.parametrize("accum_iter, images", [(1, 16), (3, 28)])
def test_pretrain_with_cuda_graph_trains_checkpoints_and_resumes(tmp_path, accum_iter, images):
    from fastmae.cli import main as fastmae_main
    from fastmae.data.synthetic import write_jpeg_folder
    from fastmae.train.checkpoints import latest_checkpoint

    jpegs, out = tmp_path / "jpegs", tmp_path / "out"
    write_jpeg_folder(jpegs, images, size=(48, 40), num_classes=2)
    flags = ["pretrain", "--data_path", str(jpegs), "--output_dir", str(out), "--model", "mae_vit_micro_patch4",
             "--input_size", "32", "--batch_size", "4", "--num_workers", "0", "--epochs", "3",
             "--warmup_epochs", "1", "--blr", "2e-3", "--log_every", "1", "--no_progress", "--device", "cuda",
             "--cuda_graph", "--accum_iter", str(accum_iter)]
    assert fastmae_main(flags + ["--max_steps", "5"]) == 0  # 3 eager warm-up steps, then the capture and a replay
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 6))
    assert all(torch.isfinite(torch.tensor(r["loss"])) and isinstance(r["lr"], float) for r in records)
    assert len({r["lr"] for r in records}) == 5  # the schedule reached the replays
    assert latest_checkpoint(out) is not None
    assert fastmae_main(flags + ["--resume", "auto", "--max_steps", "6"]) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 6


def test_running_out_of_memory_during_a_capture_is_an_out_of_memory_error():
    """torch may report an OOM inside torch.cuda.graph as the capture's own failure (capture_end raising
    in __exit__, the OOM its context); the benchmarks lower the batch on OutOfMemoryError only."""
    from fastmae.train.cuda_graph import capture_failure

    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except torch.OutOfMemoryError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as err:
        failure = capture_failure(err)
    assert isinstance(failure, torch.OutOfMemoryError) and "while capturing" in str(failure)
    assert isinstance(capture_failure(torch.OutOfMemoryError("CUDA out of memory")), torch.OutOfMemoryError)
    other = ValueError("shape mismatch")
    assert capture_failure(other) is other
