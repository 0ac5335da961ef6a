"""Found by a mutation audit of the engine: compile scopes and modes, the fused residual-add +
LayerNorm chain, attention backends, the distributed set-up (torchrun and OpenMPI variables) and
training checkpoints (ordering, --resume auto, RNG states). Everything here runs on the CPU in
seconds: torch.compile and torch.distributed are replaced by recorders where only the calls matter."""

import collections
import copy
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastmae.train.distributed as distributed
import fastmae.train.trainer as trainer_module
from fastmae.attention import Attention, check_attention_backend
from fastmae.cli import main as fastmae_main
from fastmae.compiling import CompileConfig, compile_for_training, mark_step_begin
from fastmae.models import create_model
from fastmae.train.checkpoints import (TrainingPosition, latest_checkpoint, resume_from, save_training_checkpoint,
                                       step_checkpoints)
from fastmae.train.config import PretrainConfig
from fastmae.train.optim import build_optimizer
from fastmae.train.trainer import train_step
from fastmae.vit import Block, forward_blocks
from test_kernels import _blocks_with_norm
from test_train_run import write_noise_images

MICRO = "mae_vit_micro_patch4"
CPU = torch.device("cpu")


def dispatched_ops(fn) -> "collections.Counter":
    """How many times each aten op reached the dispatcher while ``fn()`` ran (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[func] += 1
            return func(*args, **(kwargs or {}))

    with CountOps() as ops:
        fn()
    return ops.counts


# ---- compile scopes and modes ----

def _recording_compile(monkeypatch) -> list:
    """torch.compile replaced by a recorder that returns what it was given (nothing is traced)."""
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append((fn, kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def test_blocks_scope_compiles_every_block_in_place_with_static_shapes_and_the_mode(monkeypatch):
    calls = _recording_compile(monkeypatch)
    model = create_model(MICRO, kernels="torch")
    wrapper = nn.Sequential(model)  # stands for the DDP wrapper the trainer calls
    cfg = CompileConfig("blocks", mode="max-autotune-no-cudagraphs")
    assert compile_for_training(wrapper, model, cfg) is wrapper  # still the wrapper: DDP keeps syncing gradients
    blocks = [*model.blocks, *model.decoder_blocks]
    assert len(model.blocks) >= 2 and len(model.decoder_blocks) >= 1
    assert all(block._compiled_call_impl is not None for block in blocks)  # the last decoder block too
    assert [kwargs for _, kwargs in calls] == [
        {"backend": "inductor", "mode": "max-autotune-no-cudagraphs", "dynamic": False}] * len(blocks)


@pytest.mark.parametrize("mode,expected", [("default", None), ("reduce-overhead", "reduce-overhead"),
                                           ("max-autotune", "max-autotune")])
def test_model_scope_compiles_the_training_wrapper_in_the_mode_asked_for(monkeypatch, mode, expected):
    calls = _recording_compile(monkeypatch)
    model = create_model(MICRO, kernels="torch")
    wrapper = nn.Sequential(model)
    assert compile_for_training(wrapper, model, CompileConfig("model", mode=mode)) is wrapper
    assert calls == [(wrapper, {"backend": "inductor", "mode": expected})]  # the DDP wrapper, not the bare model
    assert all(block._compiled_call_impl is None for block in model.blocks)


def test_max_autotune_replays_cuda_graphs_too_so_it_needs_accum_iter_1():
    # inductor's max-autotune turns on triton.cudagraphs, as reduce-overhead does
    assert CompileConfig(mode="max-autotune").uses_cuda_graphs
    with pytest.raises(ValueError, match="--accum_iter 1"):
        PretrainConfig(compile=True, compile_mode="max-autotune", accum_iter=2)
    assert PretrainConfig(compile=True, compile_mode="max-autotune-no-cudagraphs", accum_iter=2).accum_iter == 2


def test_cuda_graph_modes_mark_each_iteration(monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = create_model(MICRO, kernels="torch")
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = [(torch.randn(2, 3, 32, 32), torch.rand(2, 64))]
    for compiled in (None, CompileConfig(), CompileConfig(mode="max-autotune-no-cudagraphs")):
        train_step(model, optimizer, scaler, batch, 0.75, None, compiled)
    assert marks == []
    train_step(model, optimizer, scaler, batch, 0.75, None, CompileConfig(mode="reduce-overhead"))
    assert marks == [1]
    mark_step_begin(CompileConfig(mode="max-autotune"))
    assert marks == [1, 1]


def test_trainer_refuses_cuda_graphs_with_ddp(tmp_path, monkeypatch):
    data = write_noise_images(tmp_path / "images", 8)
    monkeypatch.setattr(trainer_module, "DistributedDataParallel", lambda module, **kwargs: module)
    compiled = []
    monkeypatch.setattr(trainer_module, "compile_for_training", lambda *args: compiled.append(args) or args[0])
    cfg = PretrainConfig(data_path=str(data), output_dir=str(tmp_path / "out"), model=MICRO, input_size=32,
                         batch_size=2, num_workers=0, progress_bar=False, compile=True, compile_mode="reduce-overhead")
    ctx = distributed.DistributedContext(rank=0, world_size=2)
    monkeypatch.setattr(distributed.DistributedContext, "any_rank", lambda self, flag: flag)  # no process group here
    with pytest.raises(ValueError, match="runs in one process only"):
        trainer_module.Pretrainer(cfg, ctx)
    assert compiled == []


# ---- the fused residual-add + LayerNorm chain ----

def test_fused_chain_uses_each_norms_own_eps():
    """Every LayerNorm of the chain (norm1, norm2, the final norm) with its own eps, large enough to show."""
    outputs = []
    for kernels in ("triton", "torch"):
        blocks, norm = _blocks_with_norm(3, True, kernels, CPU)
        layer_norms = [m for m in (*blocks.modules(), norm) if isinstance(m, nn.LayerNorm)]
        for i, module in enumerate(layer_norms):
            module.eps = 0.05 * (i + 1)
        x = torch.randn(2, 5, 40)
        if kernels == "triton":
            assert all(block.fuses_norms(x) for block in blocks)
        outputs.append(forward_blocks(blocks, x.clone(), norm))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_fused_blocks_drop_the_same_paths_as_modules():
    """Fine-tuning's stochastic depth on the fused path: both branches dropped and rescaled like Block.forward."""
    torch.manual_seed(0)
    ref = nn.ModuleList(Block(16, 2, drop_path=0.5, kernels="torch") for _ in range(2)).train()
    fused = nn.ModuleList(Block(16, 2, drop_path=0.5, kernels="triton") for _ in range(2)).train()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(8, 5, 16)
    assert all(block.fuses_norms(x) for block in fused)
    outputs = []
    for blocks in (fused, ref):
        torch.manual_seed(1)
        outputs.append((forward_blocks(blocks, x), blocks[0](x)))
    for ours, theirs in zip(*outputs):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_fused_norms_feed_the_linears_in_the_autocast_dtype():
    blocks, norm = _blocks_with_norm(2, True, "triton", CPU)
    seen = []
    for block in blocks:
        for linear in (block.attn.qkv, block.mlp.fc1):  # hooks on the Linears leave the chain fused
            linear.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x = torch.randn(2, 5, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(block.fuses_norms(x) for block in blocks)
        out = forward_blocks(blocks, x, norm)
    assert seen == [torch.bfloat16] * 4 and out.dtype == torch.float32


# ---- attention backends ----

def test_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError, match="attention backend must be one of"):
        check_attention_backend("flash")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        Attention(16, 2, backend="flash")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        create_model(MICRO, attn="flash")


def test_attention_backend_decides_which_kernel_runs(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *args, **kwargs: calls.append(1) or sdpa(*args, **kwargs))
    math_attn, sdpa_attn = Attention(16, 2, backend="math"), Attention(16, 2, backend="sdpa")
    sdpa_attn.load_state_dict(math_attn.state_dict())
    x = torch.randn(2, 5, 16)
    out_math = math_attn(x)
    assert calls == []  # "math" is the reference's explicit softmax(QK^T)V
    torch.testing.assert_close(sdpa_attn(x), out_math, rtol=1e-5, atol=1e-6)
    assert calls == [1]


def test_attention_backward_writes_the_qkv_gradient_without_an_extra_copy():
    """Backward stacks dq, dk, dv straight into qkv's layout: one stack, no clone after it; the
    gradients are those of the reference's permute-then-unbind formulation, bit for bit."""
    torch.manual_seed(0)
    attn = Attention(32, 4, backend="sdpa")
    x = torch.randn(3, 7, 32, requires_grad=True)
    grad = torch.randn(3, 7, 32)
    ops = dispatched_ops(lambda: attn(x).backward(grad))
    assert ops[torch.ops.aten.stack.default] == 1 and ops[torch.ops.aten.clone.default] == 0
    got_x, got_w = x.grad.clone(), attn.qkv.weight.grad.clone()
    x.grad = None
    attn.zero_grad()
    qkv = attn.qkv(x).reshape(3, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)  # tests/reference_mae.py's layout
    out = F.scaled_dot_product_attention(*qkv.unbind(0)).transpose(1, 2).reshape(3, 7, 32)
    attn.proj(out).backward(grad)
    assert torch.equal(got_x, x.grad) and torch.equal(got_w, attn.qkv.weight.grad)


# ---- distributed set-up ----

def _fake_process_group(monkeypatch) -> dict:
    seen = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: seen.update(init=kwargs))
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kwargs: seen.setdefault("new_group", []).append(kwargs)
                        or "host group")
    return seen


def test_init_distributed_takes_rank_world_size_and_local_rank_from_torchrun(monkeypatch):
    seen = _fake_process_group(monkeypatch)
    for name, value in (("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    ctx = distributed.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.device) == (5, 8, 1, CPU)
    assert ctx.enabled and not ctx.is_main
    assert (seen["init"]["backend"], seen["init"]["rank"], seen["init"]["world_size"]) == ("gloo", 5, 8)
    assert "new_group" not in seen  # gloo carries the host flags itself


def test_nccl_ranks_get_a_gloo_group_for_host_flags(monkeypatch):
    seen = _fake_process_group(monkeypatch)
    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "resolve_device", lambda requested, local_rank: torch.device("cuda", local_rank))
    ctx = distributed.init_distributed("cuda")
    assert seen["init"]["backend"] == "nccl" and seen["init"]["rank"] == 3
    assert seen["new_group"] == [{"backend": "gloo"}] and ctx.host_group == "host group"


def test_bare_cuda_means_this_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    assert distributed.resolve_device("cuda", local_rank=3) == torch.device("cuda", 1)
    assert distributed.resolve_device(None, local_rank=1) == torch.device("cuda", 1)
    assert distributed.resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)


def test_one_gpu_named_for_every_process_is_refused(monkeypatch):
    """NCCL refuses two ranks on one device: --device cuda:1 under torchrun is a message, not NCCL's error
    (one visible GPU per process, as CUDA_VISIBLE_DEVICES may give, is fine)."""
    seen = _fake_process_group(monkeypatch)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(ValueError, match="--device cuda:1 names one GPU for all 8 processes, and each takes its own"):
        distributed.init_distributed("cuda:1")
    assert "init" not in seen
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(distributed, "resolve_device", lambda requested, local_rank: torch.device("cuda", 0))
    assert distributed.init_distributed("cuda:0").device == torch.device("cuda", 0)


OPENMPI = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}


def _pretrain_with_openmpi(tmp_path, monkeypatch, environment: dict, dist_on_itp: bool = True):
    """`fastmae pretrain` up to the process-group set-up: the torchrun variables it would use, or None."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", *OPENMPI):
        monkeypatch.setenv(name, "unset")  # restored after the test, whatever run() writes
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    seen = []

    def fake_init(requested_device, init_method="env://", world_size=1):
        seen.append({name: os.environ.get(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
        raise ValueError("stopped before joining a process group")

    monkeypatch.setattr(distributed, "init_distributed", fake_init)
    argv = ["pretrain", "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--no_progress"]
    code = fastmae_main(argv + (["--dist_on_itp"] if dist_on_itp else []))
    assert code == 2
    return seen[0] if seen else None


def test_dist_on_itp_takes_the_ranks_from_openmpi(tmp_path, monkeypatch, capsys):
    assert _pretrain_with_openmpi(tmp_path, monkeypatch, OPENMPI) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert _pretrain_with_openmpi(tmp_path, monkeypatch, OPENMPI, dist_on_itp=False) == {
        "RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None}  # without the flag, OpenMPI's variables are not read


def test_dist_on_itp_without_an_openmpi_variable_is_an_error(tmp_path, monkeypatch, capsys):
    partial = {k: v for k, v in OPENMPI.items() if k != "OMPI_COMM_WORLD_LOCAL_RANK"}
    assert _pretrain_with_openmpi(tmp_path, monkeypatch, partial) is None  # stopped before any set-up
    assert "--dist_on_itp needs the OpenMPI variable OMPI_COMM_WORLD_LOCAL_RANK" in capsys.readouterr().err


# ---- training checkpoints ----

def test_checkpoints_are_ordered_by_step_number_not_by_name(tmp_path):
    for name in ("checkpoint-step9.pth", "checkpoint-step10.pth", "checkpoint-step00000002.pth", "checkpoint-0.pth"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in step_checkpoints(tmp_path)] == [
        "checkpoint-step00000002.pth", "checkpoint-step9.pth", "checkpoint-step10.pth"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-step10.pth"


def _micro_training_state(kernels: str = "auto"):
    model = create_model(MICRO, kernels=kernels)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    return model, optimizer, torch.amp.GradScaler("cpu", enabled=False)


def test_resume_auto_continues_from_the_newest_of_several_checkpoints(tmp_path):
    data = write_noise_images(tmp_path / "images", 16)
    out = tmp_path / "out"
    out.mkdir()
    model, optimizer, scaler = _micro_training_state()
    for step in (1, 2, 3):
        position = TrainingPosition(step=step, epoch=0, batch=step, images_per_batch=4)
        save_training_checkpoint(out, model, optimizer, scaler, position, args={}, keep=3)
    assert len(step_checkpoints(out)) == 3
    cfg = PretrainConfig(data_path=str(data), output_dir=str(out), model=MICRO, input_size=32, batch_size=4,
                         num_workers=0, epochs=3, progress_bar=False, resume="auto")
    trainer = trainer_module.Pretrainer(cfg, distributed.DistributedContext())
    try:
        assert (trainer.position.step, trainer.position.batch) == (3, 3)
        assert trainer.last_checkpoint.name == "checkpoint-step00000003.pth"
    finally:
        trainer.logger.close()


def test_resume_restores_the_python_and_numpy_random_states(tmp_path):
    model, optimizer, scaler = _micro_training_state()
    random.seed(1)
    np.random.seed(1)
    path = save_training_checkpoint(tmp_path, model, optimizer, scaler, TrainingPosition(step=1), args={}, keep=2)
    expected = (random.random(), np.random.rand(3))
    random.seed(99)
    np.random.seed(99)
    resume_from(path, *_micro_training_state())
    assert random.random() == expected[0]
    np.testing.assert_array_equal(np.random.rand(3), expected[1])


def test_a_resumed_run_rotates_the_checkpoints_it_continues(tmp_path):
    data = write_noise_images(tmp_path / "images", 16)
    out = tmp_path / "out"
    argv = ["pretrain", "--data_path", str(data), "--output_dir", str(out), "--model", MICRO, "--input_size", "32",
            "--batch_size", "4", "--num_workers", "0", "--epochs", "3", "--threads", "1", "--no_progress",
            "--save_every", "1", "--keep_checkpoints", "2"]
    assert fastmae_main(argv + ["--max_steps", "3"]) == 0
    assert [p.name for p in step_checkpoints(out)] == ["checkpoint-step00000002.pth", "checkpoint-step00000003.pth"]
    assert fastmae_main(argv + ["--max_steps", "5", "--resume", "auto"]) == 0
    assert [p.name for p in step_checkpoints(out)] == ["checkpoint-step00000004.pth", "checkpoint-step00000005.pth"]
    assert fastmae_main(argv + ["--max_steps", "1"]) == 2  # no --resume: refused, nothing replaced
    assert [p.name for p in step_checkpoints(out)] == ["checkpoint-step00000004.pth", "checkpoint-step00000005.pth"]


def test_triton_kernels_on_a_cpu_without_the_interpreter_are_refused_before_any_output(tmp_path, monkeypatch, capsys):
    import fastmae.kernels as kernels

    data = write_noise_images(tmp_path / "images", 8)
    monkeypatch.setattr(kernels, "triton_interpreter_on", lambda: False)  # the tests run under TRITON_INTERPRET=1
    out = tmp_path / "out"
    argv = ["pretrain", "--data_path", str(data), "--output_dir", str(out), "--model", MICRO, "--input_size", "32",
            "--batch_size", "4", "--num_workers", "0", "--threads", "1", "--no_progress", "--max_steps", "1"]
    assert fastmae_main(argv + ["--kernels", "triton"]) == 2
    assert "Triton runs on CPU only through its interpreter" in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []
    # an empty metrics.jsonl (a run that failed before logging) is no earlier run to protect
    out.mkdir(exist_ok=True)
    (out / "metrics.jsonl").write_text("")
    assert fastmae_main(argv + ["--kernels", "torch"]) == 0


def test_accumulated_micro_batches_share_one_cast_of_each_weight():
    """Under autocast, the micro-batches of one step cast each weight once: the same losses and the same
    updated weights, bit for bit, as casting per micro-batch (each micro-batch in its own autocast)."""
    torch.manual_seed(0)
    base = create_model(MICRO, kernels="torch")
    micro_batches = [(torch.randn(2, 3, 32, 32), torch.rand(2, base.num_patches)) for _ in range(3)]
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def shared():
        model = copy.deepcopy(base)
        optimizer = build_optimizer(model, 1e-3, 0.05)
        losses = []
        ops = dispatched_ops(lambda: losses.append(train_step(model, optimizer, scaler, micro_batches, 0.75,
                                                              torch.bfloat16)))
        return losses[0], model, ops[torch.ops.aten._to_copy.default]

    def cast_per_micro_batch():  # what train_step computed before
        model = copy.deepcopy(base)
        optimizer = build_optimizer(model, 1e-3, 0.05)
        losses = []

        def step():
            for imgs, noise in micro_batches:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss, _, _ = model(imgs, 0.75, noise=noise, full_pred=False)
                losses.append(loss.detach())
                (loss / len(micro_batches)).backward()

        ops = dispatched_ops(step)
        optimizer.step()
        return torch.stack(losses), model, ops[torch.ops.aten._to_copy.default]

    (losses, model, casts), (want_losses, want_model, want_casts) = shared(), cast_per_micro_batch()
    assert torch.equal(losses, want_losses)
    for (name, p), q in zip(model.named_parameters(), want_model.parameters()):
        assert torch.equal(p, q), name
    linear_weights = sum(isinstance(m, nn.Linear) for m in base.modules())
    assert casts <= want_casts - 2 * linear_weights  # micro-batches 2 and 3 reuse every linear weight's cast


# ---- no host reads in a training step ----

# ops whose result the host must read: on a GPU each waits for the device (what set_sync_debug_mode
# reports in the GPU tests); on the CPU their dispatch shows a step that would wait there
HOST_READS = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.is_nonzero,
              torch.ops.aten.equal, torch.ops.aten.masked_select, torch.ops.aten._unique2,
              torch.ops.aten.unique_consecutive, torch.ops.aten.unique_dim}


def host_reads(fn) -> list[str]:
    return sorted(str(op) for op in dispatched_ops(fn) if op.overloadpacket in HOST_READS)


def test_host_reads_are_seen():
    x = torch.randn(4)
    assert host_reads(lambda: x.sum().item()) == ["aten._local_scalar_dense.default"]
    assert host_reads(lambda: bool(x.max() > 0) and x[x > 0]) != []


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("accum_iter", [1, 2])
def test_a_training_step_reads_nothing_back_on_the_host(kernels, accum_iter, monkeypatch):
    """The eager step as pretrain runs it (bf16 autocast, AdamW), and the body a CUDA graph captures,
    where a host read would fail the capture. The kernels' id checks, which read the ids on the CPU
    alone, are off as on CUDA."""
    from test_cuda_graph import EagerReplayRunner
    from fastmae.kernels import _launch
    from fastmae.train.cuda_graph import GraphedTrainStep

    monkeypatch.setattr(_launch, "ids_readable", lambda ids: False)

    model, optimizer, scaler = _micro_training_state(kernels)
    micro_batches = [(torch.randn(2, 3, 32, 32), torch.rand(2, model.num_patches)) for _ in range(accum_iter)]
    train_step(model, optimizer, scaler, micro_batches, 0.75, torch.bfloat16)  # optimizer state made
    assert host_reads(lambda: train_step(model, optimizer, scaler, micro_batches, 0.75, torch.bfloat16)) == []

    runner = EagerReplayRunner(model)
    graphed = GraphedTrainStep(model, optimizer, 0.75, torch.bfloat16, accum_iter, warmup_steps=1, runner=runner)
    graphed(micro_batches)  # the eager warm-up
    assert host_reads(lambda: graphed(micro_batches)) == []  # captured and replayed
    assert host_reads(lambda: graphed(micro_batches)) == []  # replayed
    assert runner.replays
