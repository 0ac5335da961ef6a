"""How the engine is compiled: scopes, modes and their checks (fastmae.compiling), through the
trainer's own train_step. On CPU the "aot_eager" backend traces without a C++ compiler; CUDA graphs
(reduce-overhead) are checked on the GPU."""

import pytest
import torch

from fastmae.cli import main as fastmae_main
from fastmae.compiling import CompileConfig, compile_for_training
from fastmae.models import create_model
from fastmae.train.config import PretrainConfig
from fastmae.train.optim import build_optimizer
from fastmae.train.trainer import train_step

MICRO = "mae_vit_micro_patch4"


def train_losses_and_updates(compiled: CompileConfig | None, device: torch.device, steps: int = 3,
                             accum: int = 1, autocast_dtype=None, model_name: str = MICRO, sgd: bool = False,
                             **model_kwargs):
    """Losses of ``steps`` optimizer steps of the micro model, and how far they moved each weight.
    AdamW as in training, or SGD, whose updates are proportional to the gradients (AdamW's first
    steps are lr * sign(gradient): rounding noise in a near-zero gradient becomes an lr-sized step)."""
    torch.manual_seed(0)
    model = create_model(model_name, **model_kwargs).to(device)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.05) if sgd
                 else build_optimizer(model, lr=1e-3, weight_decay=0.05))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    train_model = compile_for_training(model, model, compiled) if compiled else model
    generator = torch.Generator().manual_seed(1)
    size = model.config.img_size
    losses = []
    for _ in range(steps):
        micro_batches = [(torch.randn(4, 3, size, size, generator=generator).to(device),
                          torch.rand(4, model.num_patches, generator=generator).to(device)) for _ in range(accum)]
        losses.append(train_step(train_model, optimizer, scaler, micro_batches, 0.75, autocast_dtype, compiled))
    return torch.cat(losses), {k: v.detach() - initial[k] for k, v in model.state_dict().items()}, model


def assert_same_updates(updates: dict, expected: dict, rel: float) -> None:
    """Each weight's update within ``rel`` of the largest expected update of that weight."""
    assert updates.keys() == expected.keys()  # checkpoints keep the reference's keys
    for key, value in updates.items():
        scale = expected[key].abs().max().item()
        torch.testing.assert_close(value, expected[key], rtol=0, atol=rel * scale + 1e-7, msg=key)


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_training_computes_what_eager_computes(scope):
    cpu = torch.device("cpu")
    eager_losses, eager_updates, _ = train_losses_and_updates(None, cpu, accum=2, kernels="torch")
    torch._dynamo.reset()
    losses, updates, model = train_losses_and_updates(CompileConfig(scope, backend="aot_eager"), cpu, accum=2,
                                                      kernels="torch")
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    assert_same_updates(updates, eager_updates, rel=1e-3)
    if scope == "blocks":
        assert all(hasattr(block, "_compiled_call_impl") for block in [*model.blocks, *model.decoder_blocks])


def test_blocks_scope_compiles_one_graph_per_block_shape_whatever_the_depth():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # 6 encoder and 2 decoder blocks: two shapes, so two graphs
    train_losses_and_updates(CompileConfig("blocks", backend="aot_eager"), torch.device("cpu"), steps=2,
                             model_name="mae_vit_demo_patch8", kernels="torch")
    assert counters["stats"]["unique_graphs"] == 2


def test_compile_settings_are_checked():
    with pytest.raises(ValueError, match="scope"):
        CompileConfig("layers")
    with pytest.raises(ValueError, match="mode"):
        CompileConfig(mode="fast")
    with pytest.raises(ValueError, match="inductor mode"):
        CompileConfig(mode="reduce-overhead", backend="aot_eager")
    assert CompileConfig(mode="reduce-overhead").uses_cuda_graphs
    assert not CompileConfig(mode="max-autotune-no-cudagraphs").uses_cuda_graphs
    with pytest.raises(ValueError, match="add --compile"):
        PretrainConfig(compile_scope="blocks")
    with pytest.raises(ValueError, match="--accum_iter 1"):
        PretrainConfig(compile=True, compile_mode="reduce-overhead", accum_iter=2)
    assert PretrainConfig().compile_config() is None
    assert PretrainConfig(compile=True, compile_scope="blocks").compile_config() == CompileConfig("blocks")
    with pytest.raises(ValueError, match="blocks or decoder_blocks"):
        compile_for_training(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), CompileConfig("blocks"))


@pytest.mark.parametrize("flags,message", [
    (["--compile_mode", "reduce-overhead"], "add --compile"),
    (["--compile", "--compile_mode", "reduce-overhead", "--accum_iter", "2"], "--accum_iter 1"),
])
def test_pretrain_refuses_compile_settings_it_cannot_honour(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert fastmae_main(["pretrain", "--output_dir", str(out), "--max_steps", "1", "--no_progress", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bench_step_records_how_it_compiled(tmp_path, capsys):
    import json

    from test_bench import load_results_table_script

    code = fastmae_main(["bench", "step", "--model", MICRO, "--batch_size", "4", "--warmup", "1", "--steps", "1",
                         "--impl", "fastmae+compile", "--compile_backend", "aot_eager", "--compile_scope", "blocks",
                         "--gemm_size", "64", "--no_progress", "--out_dir", str(tmp_path)])
    assert code == 0
    # beside the default's, not over it
    (path,) = tmp_path.glob(f"step_{MICRO}_compile-blocks-default_batch4_impl-fastmae-compile_cpu_*.json")
    result = json.loads(path.read_text())
    assert result["compile"] == {"scope": "blocks", "mode": "default", "backend": "aot_eager"}
    assert "torch.compile blocks" in result["results"][0]["description"]
    capsys.readouterr()
    assert load_results_table_script().main(["--results_dir", str(tmp_path), "--include_cpu"]) == 0
    assert "| fastmae+compile (blocks, default) |" in capsys.readouterr().out
    assert fastmae_main(["bench", "step", "--model", MICRO, "--compile_backend", "aot_eager",
                         "--compile_mode", "reduce-overhead", "--json", str(path)]) == 2
    assert "inductor mode" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_cuda_graph_replays_train_like_eager(scope):
    """reduce-overhead (CUDA graphs, Triton kernels inside): the same losses and weights as eager."""
    cuda = torch.device("cuda")
    run = dict(steps=4, autocast_dtype=torch.bfloat16, sgd=True)
    eager_losses, eager_updates, _ = train_losses_and_updates(None, cuda, **run)
    torch._dynamo.reset()
    losses, updates, _ = train_losses_and_updates(CompileConfig(scope, mode="reduce-overhead"), cuda, **run)
    # bf16 autocast: inductor's fusions round differently from eager's op-by-op kernels; a gradient
    # lost or doubled by a replay moves its weight by a whole update
    torch.testing.assert_close(losses, eager_losses, rtol=1e-2, atol=1e-3)
    assert_same_updates(updates, eager_updates, rel=0.1)
