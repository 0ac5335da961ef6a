"""The step benchmark, Table 2 and the profile on CPU with small configs, and their building blocks."""

import argparse
import dataclasses
import json
import os
import statistics
import warnings

import pytest
import torch

from fastmae.bench import kernel_time
from fastmae.bench import profile as profile_cmd
from fastmae.bench import step as step_cmd
from fastmae.bench.contenders import Contender, build_contenders, fastmae_step
from fastmae.bench.environment import environment_info, resolve_dtype, result_filename
from fastmae.bench.gemm_peak import measured_gemm_flops
from fastmae.bench.hf_vitmae import transformers_available
from fastmae.bench.measure import format_row, measure_contender, model_config
from fastmae.bench.reference_style import ReferenceStyleMAE
from fastmae.bench.table2 import PAPER_SPEEDUPS, table2_rows
from fastmae.bench.timing import SyntheticImages, TimingPlan, time_steps
from fastmae.cli import main
from fastmae.device import device_from_flag
from fastmae.flops import forward_flops_per_image, train_flops_per_image
from fastmae.kernels._launch import interpreting
from fastmae.models import create_model

MICRO = "mae_vit_micro_patch4"
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Timing tests on a shared 2-core machine: two OpenMP threads fighting other jobs are 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def charts(monkeypatch):
    """The (panels, title) of every chart written during the test; the PNGs are still written."""
    import fastmae.bench.charts as charts_module

    seen = []
    write = charts_module.write_bar_chart

    def recording(path, panels, title):
        seen.append((panels, title))
        return write(path, panels, title)

    for module in (charts_module, step_cmd, profile_cmd):
        monkeypatch.setattr(module, "write_bar_chart", recording)
    return seen


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_reference_style_is_the_same_model(norm_pix_loss):
    model = create_model(MICRO, kernels="torch", norm_pix_loss=norm_pix_loss)
    reference = ReferenceStyleMAE(model.config)
    reference.load_state_dict(model.state_dict())
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 64)
    loss, pred, mask = model(imgs, noise=noise)
    ref_loss, ref_pred, ref_mask = reference(imgs, noise=noise)
    torch.testing.assert_close(ref_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref_pred, pred, rtol=1e-5, atol=1e-5)
    assert torch.equal(ref_mask, mask)
    # the attention really is the written-out softmax(QK^T)V
    assert all(blk.attn.backend == "math" for blk in reference.blocks)


def test_training_steps_learn():
    """Each contender's step is a real optimisation step: the loss on a fixed batch goes down."""
    config = model_config(MICRO)
    imgs = torch.randn(8, 3, 32, 32)
    names = ("fastmae", "naive w/[M]", "reference-style") + (("hf-vitmae",) if transformers_available() else ())
    for contender in build_contenders(config, CPU, torch.float32, 0.75, names):
        step = contender.build()
        torch.manual_seed(0)
        first = float(step(imgs))
        for _ in range(4):
            last = float(step(imgs))
        assert last < first, contender.name
    flops = {c.name: c.train_flops_per_image for c in build_contenders(config, CPU, torch.float32, 0.75, names)}
    assert flops["naive w/[M]"] > flops["reference-style"] > flops["fastmae"]


@pytest.mark.skipif(not transformers_available(), reason="transformers not installed")
def test_hf_vitmae_matches_config():
    from fastmae.bench.hf_vitmae import HFViTMAELoss, build_hf_vitmae

    config = model_config(MICRO)
    hf = HFViTMAELoss(build_hf_vitmae(config))
    ours = create_model(MICRO, kernels="torch")
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours.parameters())
    loss, pred, mask = hf(torch.randn(2, 3, 32, 32))
    assert pred.shape == (2, 64, 48) and mask.sum() == 2 * 48 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="mask_ratio"):
        hf(torch.randn(2, 3, 32, 32), mask_ratio=0.5)


def test_time_steps_counts_and_summary():
    calls = []
    times = time_steps(lambda: calls.append(1), TimingPlan(2, 5), CPU, batch_size=4, progress=False)
    assert len(calls) == 7 and len(times.times_s) == 5
    summary = times.summary()
    assert summary["min_s"] <= summary["median_s"] <= summary["max_s"]
    assert summary["images_per_s"] == pytest.approx(4 / summary["mean_s"])  # sustained, not batch / median
    with pytest.raises(ValueError, match="--steps >= 1"):
        TimingPlan(1, 0)
    batches = SyntheticImages(2, 8, CPU, count=3)
    seen = [next(batches) for _ in range(4)]
    assert seen[0] is seen[3] and not torch.equal(seen[0], seen[1])


def test_gemm_rate_and_environment():
    gemm = measured_gemm_flops(CPU, torch.float32, size=128, repeats=1)
    assert gemm["flops_per_s"] > 0 and gemm["size"] == 128
    with pytest.raises(ValueError, match="GEMM size"):
        measured_gemm_flops(CPU, torch.float32, size=0)
    info = environment_info(CPU)
    for key in ("device", "torch", "triton", "cuda", "git", "utc_time"):
        assert key in info
    assert result_filename("step", CPU).startswith("step_cpu_")
    assert resolve_dtype("auto", CPU) == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", CPU)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            device_from_flag("cuda")


def test_bench_step_cli_writes_everything(tmp_path, capsys):
    path = tmp_path / "step.json"
    impl = "fastmae,fastmae+compile,naive w/[M],reference-style" + (",hf-vitmae" if transformers_available() else "")
    code = main(["bench", "step", "--model", MICRO, "--batch_size", "8", "--warmup", "1", "--steps", "2",
                 "--impl", impl, "--compile_backend", "aot_eager", "--gemm_size", "128", "--no_progress",
                 "--json", str(path)])
    assert code == 0
    result = json.loads(path.read_text())
    for key in ("environment", "config", "batch_size", "dtype", "warmup_steps", "timed_steps", "measured_gemm", "speedups"):
        assert key in result
    assert result["environment"]["git"]["commit"] and result["dtype"] == "fp32" and result["batch_size"] == 8
    rows = {r["name"]: r for r in result["results"]}
    assert set(rows) == set(impl.split(","))
    for row in rows.values():
        assert len(row["step_times_s"]) == 2 and row["images_per_s"] > 0 and row["mfu_measured_gemm"] > 0
        assert row["mfu_spec"] is None  # no spec peak for a CPU
        assert row["first_step_s"] > 0  # the warm-up step that compiles
    assert rows["fastmae"]["train_flops_per_image"] == train_flops_per_image(model_config(MICRO))
    assert "fastmae / naive w/[M]" in result["speedups"]
    assert "speedup fastmae / naive w/[M]" in capsys.readouterr().out
    assert is_png(path.with_suffix(".png"))


def test_bench_step_records_a_failing_contender_and_measures_the_others(tmp_path, capsys, monkeypatch, charts):
    import fastmae.bench.contenders as contenders

    def broken(*args):
        raise RuntimeError("this transformers version rejects noise=")

    monkeypatch.setattr(contenders, "_reference_style_step", broken)
    path = tmp_path / "step.json"
    code = main(["bench", "step", "--model", MICRO, "--batch_size", "4", "--warmup", "1", "--steps", "2",
                 "--impl", "fastmae,naive w/[M],reference-style", "--gemm_size", "64", "--no_progress",
                 "--json", str(path)])
    assert code == 1
    rows = {r["name"]: r for r in json.loads(path.read_text())["results"]}
    assert rows["reference-style"]["error"] == "RuntimeError: this transformers version rejects noise="
    assert rows["fastmae"]["images_per_s"] > 0 and rows["naive w/[M]"]["images_per_s"] > 0
    assert "reference-style failed" in capsys.readouterr().err
    # the chart: a bar per contender at its img/s, the failed one marked
    ((panel,), title), = charts
    assert is_png(path.with_suffix(".png")) and MICRO in title
    assert panel.labels == ["fastmae", "naive w/[M]", "reference-style"]
    (series,) = panel.series
    assert series.values == [rows["fastmae"]["images_per_s"], rows["naive w/[M]"]["images_per_s"], None]
    assert series.notes[2] == "failed" and series.notes[0].startswith(f"{rows['fastmae']['images_per_s']:.0f}\n")
    assert load_results_table_script().main(["--results_dir", str(tmp_path), "--include_cpu"]) == 0
    assert "| reference-style | failed: RuntimeError: this transformers version" in capsys.readouterr().out


def test_bench_step_cli_rejects_bad_input(capsys):
    assert main(["bench", "step", "--model", "vit_nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["bench", "step", "--model", MICRO, "--impl", "fastmae,turbo"]) == 2
    assert "turbo" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown implementations"):
        build_contenders(model_config(MICRO), CPU, torch.float32, 0.75, ("turbo",))
    assert main(["bench", "step", "--model", MICRO, "--dtype", "fp8"]) == 2
    assert "dtype" in capsys.readouterr().err
    assert main(["bench", "table2", "--models", MICRO, "--mask_ratio", "1.0"]) == 2
    assert "mask_ratio" in capsys.readouterr().err
    assert main(["bench", "step", "--model", MICRO, "--batch_size", "0"]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_table2_rows_follow_the_paper():
    rows = table2_rows(("mae_vit_large_patch16", "mae_vit_huge_patch14"))
    assert [(r.decoder_depth, r.encoder_mask_tokens, r.paper_speedup) for r in rows[:3]] == [
        (8, True, 1.0), (8, False, 2.8), (1, False, 3.7)]
    assert [r.paper_speedup for r in rows[3:]] == [1.0, 3.5, 4.1]
    assert PAPER_SPEEDUPS[("mae_vit_huge_patch14", 1)] == 4.1


def test_table2_small_shows_the_speedup(tmp_path):
    """On CPU a small encoder without mask tokens already beats the naive baseline (fewer FLOPs)."""
    path = tmp_path / "table2.json"
    code = main(["bench", "table2", "--models", MICRO, "--batch_size", "32", "--warmup", "1", "--steps", "5",
                 "--no_progress", "--json", str(path)])
    assert code == 0
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert [(r["decoder_depth"], r["encoder_mask_tokens"]) for r in rows] == [(8, True), (8, False), (1, False)]
    assert rows[0]["measured_speedup"] == 1.0
    assert rows[2]["flop_limit_speedup"] > rows[1]["flop_limit_speedup"] > 1
    assert rows[2]["measured_speedup"] > 1.0
    assert path.with_suffix(".png").stat().st_size > 1000


def test_profile_cli(tmp_path, capsys, charts):
    path = tmp_path / "profile.json"
    assert main(["profile", "--model", MICRO, "--batch_size", "4", "--warmup", "1", "--steps", "2",
                 "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["flop_cross_check"]["passed"]
    flops = report["flops_per_image"]
    assert flops["with_mask_tokens"]["forward_total"] > flops["without_mask_tokens"]["forward_total"]
    assert flops["without_mask_tokens"]["train_total"] == pytest.approx(3 * flops["without_mask_tokens"]["forward_total"])
    checks = {c["claim"][:30]: c for c in report["paper_checks"]}
    assert len(checks) == 3
    phases = report["time"]["median_s"]
    assert set(phases) == set(profile_cmd.PHASES) and all(v >= 0 for v in phases.values())
    assert sum(phases.values()) == pytest.approx(report["time"]["step_median_s"], rel=0.5)
    saved = report["activations"]["saved_bytes_per_image"]
    assert saved["encoder"] > 0 and saved["decoder"] > 0
    params = report["parameters"]
    assert params["encoder"]["parameters"] + params["decoder"]["parameters"] == sum(
        p.numel() for p in create_model(MICRO).parameters())
    printed = capsys.readouterr().out
    assert "The paper's statements" in printed and "Device time by kind" in printed
    # the chart: training FLOPs per component (w/o and w/ mask tokens), then the measured phases
    ((flop_panel, time_panel), _), = charts
    assert is_png(path.with_suffix(".png"))
    assert [s.values for s in flop_panel.series] == [
        [flops[key]["train"][c] / 1e6 for c in profile_cmd.COMPONENTS] for key in ("without_mask_tokens", "with_mask_tokens")]
    assert "MFLOP" in flop_panel.ylabel
    assert time_panel.series[0].values == [1e3 * phases[p] for p in profile_cmd.PHASES]
    kernels = report["kernel_time"]
    assert len(kernels["top"]) == 15 and kernels["by_kind"]["matmul"]["seconds_per_step"] > 0
    assert main(["profile", "--model", "nope"]) == 2
    assert main(["profile", "--model", MICRO, "--kernel_table", "-1"]) == 2


def test_profile_out_of_memory_names_the_batch_to_try(tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(profile_cmd, "activation_split", out_of_memory)
    path = tmp_path / "p.json"
    assert main(["profile", "--model", MICRO, "--batch_size", "8", "--json", str(path)]) == 2
    assert "out of cpu memory at batch 8; try --batch_size 4" in capsys.readouterr().err
    assert not path.exists()


@pytest.mark.parametrize("name, kind", [
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(Params)", "matmul"),
    ("aten::addmm", "matmul"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128>>(Params)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("_add_layer_norm_fwd_kernel", "fastmae triton"),
    ("_decoder_unshuffle_bwd_kernel", "fastmae triton"),
    ("_visible_patch_embed_fwd_kernel", "fastmae triton"),
    ("_masked_patch_loss_kernel", "fastmae triton"),
    ("_position_epilogue_kernel", "fastmae triton"),  # the default encoder-input route's kernel beside cuBLAS
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>(int, float)", "normalization"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormTwoOps<float, float>>>", "reductions"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&)>", "activation (GELU)"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)>", "casts and copies"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>", "casts and copies"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>, unsigned int, 5, 64, 64>", "casts and copies"),
    ("aten::_to_copy", "casts and copies"),
    ("aten::sum", "reductions"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", kernel_time.OTHER),
    ("void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("Memcpy HtoD (Pageable -> Device)", kernel_time.OTHER),
])
def test_kernel_kinds_from_kernel_names(name, kind):
    assert kernel_time.kernel_kind(name) == kind


def test_step_kernel_times_add_up_per_step():
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    times = kernel_time.step_kernel_times(lambda: (a @ b).relu().sum(), CPU, steps=4, top=2)
    assert times["profiled_steps"] == 4 and len(times["top"]) == 2
    assert sum(k["seconds_per_step"] for k in times["by_kind"].values()) == pytest.approx(times["seconds_per_step"])
    assert sum(k["share"] for k in times["by_kind"].values()) == pytest.approx(1.0)
    assert times["top"][0]["seconds_per_step"] >= times["top"][1]["seconds_per_step"]
    calls = {row["name"]: row["calls_per_step"] for row in times["top"]}
    assert all(count == int(count) >= 1 for count in calls.values())  # counted over 4 steps, given per step
    assert "Device time by kind (ATen operators" in kernel_time.format_kernel_times(times)
    with pytest.raises(ValueError, match="steps >= 1"):
        kernel_time.step_kernel_times(lambda: None, CPU, steps=0)
    with pytest.raises(RuntimeError, match="no device time"):
        kernel_time.step_kernel_times(lambda: None, CPU)


def test_profile_component_cross_check_on_vit_large():
    """Component by component, ViT-L's analytic FLOPs are what flop_counter counts (meta device)."""
    config = model_config("mae_vit_large_patch16")
    check = profile_cmd.flop_cross_check(config, 0.75)
    assert check["passed"]
    row = check["without_mask_tokens"]["encoder_blocks"]
    assert row["analytic"] == pytest.approx(row["flop_counter"], rel=1e-9)
    large = {c["claim"][:30]: c["holds"] for c in profile_cmd.paper_checks(config, 0.75)}
    assert all(large.values())  # the paper's three statements hold for ViT-L
    # the two stated for ViT-L alone are not judged on another model
    base = [c["holds"] for c in profile_cmd.paper_checks(model_config("mae_vit_base_patch16"), 0.75)]
    assert base[0] is True and base[1:] == [None, None]


def test_activation_split_without_mask_tokens_is_smaller():
    step = fastmae_step(model_config(MICRO), CPU, torch.float32, 0.75)
    naive = fastmae_step(model_config(MICRO), CPU, torch.float32, 0.75, encoder_mask_tokens=True)
    imgs = torch.randn(4, 3, 32, 32)
    ours = profile_cmd.activation_split(step.model, imgs, 0.75, None)["saved_bytes_per_image"]
    theirs = profile_cmd.activation_split(naive.model, imgs, 0.75, None)["saved_bytes_per_image"]
    assert theirs["encoder"] > 3 * ours["encoder"]


def test_activation_split_per_image_leaves_out_autocast_weight_copies():
    """Under bf16 autocast the weight copies are saved once per batch: not part of the per-image cost."""
    step = fastmae_step(model_config(MICRO), CPU, torch.float32, 0.75)
    imgs = torch.randn(8, 3, 32, 32)
    fp32 = profile_cmd.activation_split(step.model, imgs, 0.75, None)
    bf16 = profile_cmd.activation_split(step.model, imgs, 0.75, torch.bfloat16)
    # each block's four Linear weights (qkv, proj, fc1, fc2: 12 D^2 values) are cast to bf16 once per batch
    config = model_config(MICRO)
    copies = 2 * 12 * config.embed_dim**2 * config.depth
    assert bf16["saved_bytes_per_batch_fixed"]["encoder"] >= copies
    assert fp32["saved_bytes_per_batch_fixed"]["encoder"] < copies / 4
    # activations: bf16 about half of fp32 per image
    assert 0.3 < bf16["saved_bytes_per_image"]["encoder"] / fp32["saved_bytes_per_image"]["encoder"] < 0.8
    with pytest.raises(ValueError, match="at least 2"):
        profile_cmd.activation_split(step.model, imgs[:1], 0.75, None)


def load_benchmark_script(name: str):
    """benchmarks/<name>.py (a script, not a package module) loaded as module ``name``."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def load_results_table_script():
    return load_benchmark_script("make_results_table")


def test_readme_holds_the_results_tables_of_the_committed_results(capsys):
    """The README's results tables are the generator's output on benchmarks/results as committed: a result
    file added, replaced or removed without regenerating them shows here."""
    table = load_results_table_script()
    assert table.main([]) == 0
    generated = capsys.readouterr().out.rstrip("\n")
    readme = (table.README_DIR / "README.md").read_text()
    assert generated.startswith("#### Training step") and generated in readme, \
        "README.md's results tables differ from `python benchmarks/make_results_table.py`: paste its output"


def test_results_table(tmp_path, capsys):
    table = load_results_table_script()
    assert table.main(["--results_dir", str(tmp_path)]) == 0
    assert "No benchmark results yet" in capsys.readouterr().out
    (tmp_path / "cut.json").write_text('{"benchmark": "step"}')  # valid JSON, not a whole result: a KeyError
    assert table.main(["--results_dir", str(tmp_path)]) == 2
    assert "cut.json is not a whole result file (no 'environment' record)" in capsys.readouterr().err
    (tmp_path / "cut.json").unlink()
    quick = ["--warmup", "0", "--steps", "1", "--batch_size", "2", "--no_progress"]
    assert main(["bench", "step", "--model", MICRO, "--impl", "fastmae,naive w/[M]", "--gemm_size", "64",
                 "--out_dir", str(tmp_path), *quick]) == 0
    assert main(["bench", "table2", "--models", MICRO, "--out_dir", str(tmp_path), *quick]) == 0
    assert main(["profile", "--model", MICRO, "--json", str(tmp_path / "profile.json"), *quick[:4]]) == 0
    capsys.readouterr()
    assert table.main(["--results_dir", str(tmp_path)]) == 0  # CPU results are left out by default
    assert "No benchmark results yet" in capsys.readouterr().out
    assert table.main(["--results_dir", str(tmp_path), "--include_cpu"]) == 0
    out = capsys.readouterr().out
    assert "#### Training step" in out and "| mae_vit_micro_patch4 |" in out and "naive w/[M]" in out
    assert "#### Table 2" in out and "#### Where the step's time goes" in out
    # an ablation run (the PyTorch references instead of the kernels) gets its own file and row names
    assert main(["bench", "step", "--model", MICRO, "--impl", "fastmae,reference-style", "--kernels", "torch",
                 "--gemm_size", "64", "--out_dir", str(tmp_path), *quick]) == 0
    assert len(list(tmp_path.glob("step_*.json"))) == 2 and list(tmp_path.glob("step_*_kernels-torch_*.json"))
    assert len(list(tmp_path.glob("step_*_batch2_impl-*_cpu_*.json"))) == 2  # batch and contenders in the name
    assert table.main(["--results_dir", str(tmp_path), "--include_cpu"]) == 0
    out = capsys.readouterr().out
    assert "| fastmae (kernels torch) |" in out and "| reference-style |" in out and "| fastmae |" in out
    (tmp_path / "broken.json").write_text("{")
    assert table.main(["--results_dir", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_bench_step_real_data(tmp_path):
    """--real_data feeds the embedded photographs through the CPU loader inside the timed step."""
    path = tmp_path / "real.json"
    assert main(["bench", "step", "--model", MICRO, "--impl", "fastmae", "--real_data", "--num_workers", "0",
                 "--warmup", "1", "--steps", "2", "--batch_size", "4", "--gemm_size", "64", "--no_progress",
                 "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["data"].startswith("real (cpu loader")
    assert result["results"][0]["images_per_s"] > 0


def test_out_of_memory_halves_the_batch(tmp_path, monkeypatch):
    from fastmae.bench import step as step_cmd
    from fastmae.bench.contenders import Contender
    from fastmae.bench.measure import BatchTooLarge, measure_contender

    def no_memory():
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(BatchTooLarge, match="out of memory at batch 64"):
        measure_contender(Contender("x", "", "fp32", 1.0, no_memory), iter([]), TimingPlan(0, 1), CPU, 64, None, 1.0)

    measured_batches = []
    real_bench_model = step_cmd.bench_model

    def bench_model_with_small_memory(args, name, device, dtype, batch_size, gemm, names, compiled, save):
        measured_batches.append(batch_size)
        if batch_size > 4:
            raise BatchTooLarge(f"fastmae: out of memory at batch {batch_size}")
        return real_bench_model(args, name, device, dtype, batch_size, gemm, names, compiled, save)

    monkeypatch.setattr(step_cmd, "bench_model", bench_model_with_small_memory)
    path = tmp_path / "oom.json"
    args = ["bench", "step", "--model", MICRO, "--impl", "fastmae", "--batch_size", "16", "--warmup", "0",
            "--steps", "1", "--gemm_size", "64", "--no_progress", "--json", str(path)]
    assert main(args) == 1  # without --oom_fallback: a clear error
    assert main(args + ["--oom_fallback"]) == 0
    assert measured_batches == [16, 16, 8, 4]
    assert json.loads(path.read_text())["batch_size"] == 4


def stop_after(count: int, measure):
    """``measure`` that raises KeyboardInterrupt (what a time limit's signal looks like to Python) once
    ``count`` measurements are done."""
    done = []

    def measure_then_stop(*args, **kwargs):
        if len(done) == count:
            raise KeyboardInterrupt
        done.append(args[0].name)
        return measure(*args, **kwargs)

    return measure_then_stop


def test_a_stopped_step_benchmark_keeps_what_it_measured(tmp_path, monkeypatch, capsys):
    table = load_results_table_script()
    path = tmp_path / "step.json"
    args = ["bench", "step", "--model", MICRO, "--impl", "fastmae,naive w/[M],reference-style", "--batch_size", "2",
            "--warmup", "0", "--steps", "1", "--gemm_size", "64", "--no_progress", "--json", str(path)]
    monkeypatch.setattr(step_cmd, "measure_contender", stop_after(2, step_cmd.measure_contender))
    assert main(args) == 130
    partial = json.loads(path.read_text())
    assert partial["complete"] is False and partial["pending"] == ["reference-style"]
    assert [r["name"] for r in partial["results"]] == ["fastmae", "naive w/[M]"]  # the naive row is measured first
    assert all(r["images_per_s"] > 0 for r in partial["results"]) and "fastmae / naive w/[M]" in partial["speedups"]
    assert partial["environment"]["git"]["commit"] and partial["batch_size"] == 2
    assert sorted(f.name for f in tmp_path.iterdir()) == ["step.json", "step.png"]  # no temporary file left
    assert table.main(["--results_dir", str(tmp_path), "--include_cpu"]) == 0
    out = capsys.readouterr().out
    assert "| fastmae |" in out and "`step.json` is partial: the run stopped before reference-style." in out
    monkeypatch.undo()
    assert main(args) == 0
    full = json.loads(path.read_text())
    assert full["complete"] is True and full["pending"] == [] and len(full["results"]) == 3
    assert table.main(["--results_dir", str(tmp_path), "--include_cpu"]) == 0
    assert "partial" not in capsys.readouterr().out


def test_a_stopped_table2_keeps_its_measured_rows(tmp_path, monkeypatch, capsys):
    import fastmae.bench.table2 as table2_cmd

    path = tmp_path / "table2.json"
    monkeypatch.setattr(table2_cmd, "measure_contender", stop_after(2, table2_cmd.measure_contender))
    assert main(["bench", "table2", "--models", MICRO, "--batch_size", "2", "--warmup", "0", "--steps", "1",
                 "--no_progress", "--json", str(path)]) == 130
    partial = json.loads(path.read_text())
    rows = table2_rows((MICRO,))
    assert [r["label"] for r in partial["rows"]] == [rows[0].label, rows[1].label]
    assert partial["complete"] is False and partial["pending"] == [rows[2].label]
    assert partial["rows"][0]["measured_speedup"] == 1.0 and partial["rows"][1]["measured_speedup"] > 0
    assert load_results_table_script().main(["--results_dir", str(tmp_path), "--include_cpu"]) == 0
    assert f"`table2.json` is partial: the run stopped before {rows[2].label}." in capsys.readouterr().out


def test_results_table_shows_the_data_loaders_and_a_training_run(tmp_path, capsys):
    from fastmae.data.synthetic import write_jpeg_folder

    write_jpeg_folder(tmp_path / "jpegs", 12, num_classes=2)
    results = tmp_path / "results"
    assert main(["bench", "data", "--data_path", str(tmp_path / "jpegs"), "--loaders", "cpu", "--batch_size", "4",
                 "--input_size", "32", "--num_threads", "1", "--warmup", "1",
                 "--json", str(results / "data.json"), "--plot", str(results / "data.png")]) == 0
    data = json.loads((results / "data.json").read_text())
    assert data["benchmark"] == "data" and data["complete"] is True and data["environment"]["git"]["commit"]
    augment = next(r["img_per_s"] for r in data["results"] if r["mode"] == "augment")
    table = load_results_table_script()
    assert table.main(["--results_dir", str(results), "--include_cpu"]) == 0
    out = capsys.readouterr().out
    assert "#### Data loaders" in out and f"![data.png]({os.path.relpath(results, table.README_DIR)}/data.png)" in out
    assert f"| cpu | augment | - | {augment:.0f} | - | 4 | 1 |" in out  # no ViT-B step result to compare with
    # a ViT-B step on the same device: the loader's img/s as a multiple of the fastest fastmae row
    step = {"benchmark": "step", "model": "mae_vit_base_patch16", "environment": data["environment"], "dtype": "bf16",
            "batch_size": 256, "results": [
                {"name": "fastmae", "images_per_s": augment / 4, "median_s": 1.0, "p10_s": 1.0, "p90_s": 1.0},
                {"name": "fastmae+compile", "images_per_s": augment / 2, "median_s": 1.0, "p10_s": 1.0, "p90_s": 1.0},
                {"name": "naive w/[M]", "images_per_s": augment, "median_s": 1.0, "p10_s": 1.0, "p90_s": 1.0}]}
    (results / "step.json").write_text(json.dumps(step))
    assert table.main(["--results_dir", str(results), "--include_cpu"]) == 0
    out = capsys.readouterr().out
    assert f"| cpu | augment | - | {augment:.0f} | 2.00x |" in out and "| cpu | decode | - |" in out
    # a training run on the same files: its summary.json is a row of its own
    assert main(["pretrain", "--data_path", str(tmp_path / "jpegs"), "--model", MICRO, "--input_size", "32",
                 "--batch_size", "4", "--num_workers", "0", "--max_steps", "4", "--log_every", "2", "--threads", "1",
                 "--no_progress", "--output_dir", str(results)]) == 0
    summary = json.loads((results / "summary.json").read_text())
    assert table.main(["--results_dir", str(results), "--include_cpu"]) == 0
    out = capsys.readouterr().out
    steady = summary["after_first_window"]
    assert "#### Training runs on JPEG files" in out
    assert (f"| {MICRO} | cpu | eager | 12 | 4 | fp32 | 2 | {steady['img_per_s']:.0f} | "
            f"{100 * steady['data_wait_fraction']:.1f}% | - |") in out
    summary["compile"] = {"scope": "blocks", "mode": "default", "backend": "inductor"}
    (results / "summary.json").write_text(json.dumps(summary))
    assert table.main(["--results_dir", str(results), "--include_cpu"]) == 0
    assert f"| {MICRO} | cpu | compiled (blocks, default) | 12 |" in capsys.readouterr().out
    summary["compile"], summary["cuda_graph"] = None, True
    (results / "summary.json").write_text(json.dumps(summary))
    assert table.main(["--results_dir", str(results), "--include_cpu"]) == 0
    assert f"| {MICRO} | cpu | CUDA graph | 12 |" in capsys.readouterr().out


def test_sync_sites_count_each_synchronising_call_and_nothing_else():
    def recorded(message: str, lineno: int) -> warnings.WarningMessage:
        return warnings.WarningMessage(UserWarning(message), UserWarning, "step.py", lineno)

    caught = [recorded("Synchronization debug mode is a prototype feature and does not yet detect all "
                       "synchronizing operations", 1),  # the debug mode's first use in a process
              recorded("called a synchronizing CUDA operation", 7),
              recorded("called a synchronizing CUDA operation", 7),
              recorded("called a synchronizing CUDA operation", 9)]
    assert profile_cmd.sync_sites(caught) == ["step.py:7", "step.py:7", "step.py:9"]


@pytest.mark.gpu
def test_host_sync_detection_on_gpu():
    x = torch.ones(4, device="cuda")
    assert profile_cmd.host_syncs(lambda: x + 1) == []  # first: the prototype warning is no sync
    assert len(profile_cmd.host_syncs(lambda: (x.sum().item(), x.max().item()))) == 2


@pytest.mark.gpu
def test_gpu_commands_on_micro(tmp_path):
    quick = ["--warmup", "1", "--steps", "3", "--batch_size", "8", "--device", "cuda"]
    assert main(["profile", "--model", MICRO, "--json", str(tmp_path / "p.json"), *quick]) == 0
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["peak_memory_bytes"] > 0 and "allocated_growth_bytes_per_image" in report["activations"]
    assert report["host_syncs_in_step"] == []  # the training step queues work ahead of the GPU
    assert report["kernel_time"]["what"] == "CUDA kernels" and report["kernel_time"]["by_kind"]["matmul"]["share"] > 0
    assert 0 < report["kernel_time"]["device_busy_fraction"] < 1.2  # the profiler's kernels against the timed step
    assert main(["bench", "step", "--model", MICRO, "--compile", "off", "--json", str(tmp_path / "s.json"),
                 "--gemm_size", "2048", "--no_progress", *quick]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["dtype"] == "bf16"
    for row in result["results"]:
        assert row["peak_memory_bytes"] > 0 and row["images_per_s"] > 0
    assert main(["bench", "table2", "--models", MICRO, "--out_dir", str(tmp_path), "--no_progress", *quick]) == 0


def test_gpu_suite_script_checks_its_parts_and_the_gpu(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu_suite.sh"
    bad = subprocess.run(["bash", str(script), str(tmp_path / "out"), "tests", "bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown part 'bogus'" in bad.stderr
    if not torch.cuda.is_available():
        no_gpu = subprocess.run(["bash", str(script), str(tmp_path / "out"), "large"], capture_output=True, text=True)
        assert no_gpu.returncode == 2 and "needs a CUDA GPU" in no_gpu.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not interpreting(), reason="the Triton side needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.filterwarnings("ignore:.*autocast")
def test_kernel_benchmark_cases_run_both_sides_and_agree():
    """Every case of the GPU kernel benchmark, at ViT-B shapes and batch 2 on CPU: the Triton side
    (interpreter) and the eager side run and compute the same forward outputs."""
    bench = load_benchmark_script("kernels_gpu")
    for name, make_case in bench.CASES.items():
        case = make_case(bench.MODEL_SHAPES["vit_b"], 2, True, CPU)
        impls = bench.implementations(name)
        del impls["compiled"]  # inductor needs a C++ compiler on CPU
        agreement = bench.check_agreement(case, impls)
        assert agreement["max_abs_diff_forward"] <= 1e-2 * agreement["max_abs_eager_forward"], name
        assert case.bytes_floor > 0 and case.floor_note, name
    # the kernel table the benchmark keeps per implementation, here over the eager side's operators
    times = kernel_time.step_kernel_times(lambda: case.step(impls["eager"]), CPU, steps=1, top=4)
    assert len(times["top"]) == 4 and times["by_kind"]["normalization"]["seconds_per_step"] > 0  # add + LayerNorm


@pytest.mark.skipif(not interpreting(), reason="the Triton side needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.filterwarnings("ignore:.*autocast")
def test_kernel_shape_sweep_runs_its_shapes_and_checks_them(monkeypatch):
    """The launch-shape sweep on CPU (interpreter, micro shapes, a stub timer): each shape replaces the
    launcher's choice, is checked against its gradients and timed; a shape that breaks is recorded."""
    sweep = load_benchmark_script("kernel_shapes_gpu")
    micro = sweep.kernels_gpu.ModelShape("micro/4", 32, 4, 64)
    calls = []

    def stub_timer(fn):
        fn()
        calls.append(1)
        return [1e-3 * len(calls)]

    for kernel, (module, make_variants) in sweep.kernel_modules().items():
        variants = make_variants(module)
        assert len({v.label for v in variants}) == len(variants) >= (2 if kernel == "encoder_input" else 12)
        chosen = variants[:2] + variants[-1:] if len(variants) > 2 else variants
        entry = sweep.measure(kernel, micro, 2, stub_timer, CPU, variants=chosen)
        assert [row["label"] for row in entry["variants"]] == [v.label for v in chosen]
        assert all("median_ms" in row for row in entry["variants"]), entry["variants"]
        assert entry["best"]["label"] == chosen[0].label and entry["best_speedup_vs_default"] > 0
    lines = load_results_table_script().kernel_shapes_table([{"environment": {"device": "GPU X"}, "results": [entry]}])
    best = entry["best"]
    assert (f"| add_layer_norm | micro/4 | {entry['launcher_default']['median_ms']:.3f} | {best['median_ms']:.3f} | "
            f"{best['label']} | {entry['best_speedup_vs_default']:.2f}x | 3 of 3 | GPU X |") in lines
    assert {sweep.measure("encoder_input", micro, 2, stub_timer, CPU)["variants"][i]["gemm"] for i in (0, 1)} \
        == {"triton", "cublas"}
    broken = sweep.Variant("broken", {}, {"_launch_shape": lambda *a: (_ for _ in ()).throw(RuntimeError("refused"))})
    entry = sweep.measure("decoder_input", micro, 2, stub_timer, CPU, variants=[broken])
    assert entry["variants"][0]["error"] == "RuntimeError: refused" and entry["best"] is None
    lines = load_results_table_script().kernel_shapes_table([{"environment": {"device": "GPU X"}, "results": [entry]}])
    assert "| - | - | - | 0 of 1 | GPU X |" in lines[-1]


def test_kernel_shape_sweep_allows_an_ulp_of_reordered_sums_and_no_more():
    """On the H100 every add + LayerNorm shape with 4 warps was refused: its bf16 outputs were an ulp off
    the launcher's (0.0078 relative), as any other order of a row's sums gives."""
    sweep = load_benchmark_script("kernel_shapes_gpu")
    expected = torch.linspace(1, 2, 1000).to(torch.bfloat16)
    sweep.check_same_result(expected + 2**-7, expected)  # a bf16 ulp in [1, 2)
    sweep.check_same_result(-expected - 2**-7, -expected)
    with pytest.raises(AssertionError):
        sweep.check_same_result(expected * 1.05, expected)
    fp32 = torch.linspace(-4, 4, 1000)
    sweep.check_same_result(fp32 * (1 + 1e-5), fp32)
    with pytest.raises(AssertionError):
        sweep.check_same_result(fp32 * (1 + 1e-2), fp32)
    tiny = expected * 1e-6  # a loss gradient's scale: held to it, not to an absolute 1e-3
    sweep.check_same_result(tiny + 2**-7 * 1e-6, tiny)
    for wrong in (torch.zeros_like(tiny), -tiny):
        with pytest.raises(AssertionError):
            sweep.check_same_result(wrong, tiny)


@pytest.mark.gpu
def test_kernel_benchmark_run_on_gpu(tmp_path):
    bench = load_benchmark_script("kernels_gpu")
    args = argparse.Namespace(batch=4, warmup=1, iters=2, kernels=["decoder_input"], models=["vit_b"], modes=["amp"])
    report = bench.run(args, tmp_path / "k.json")
    (entry,) = report["results"]
    assert report["complete"] and "median_ms" in entry["triton"] and "median_ms" in entry["compiled"]
    assert entry["triton"]["kernel_time"]["by_kind"]["fastmae triton"]["share"] > 0
    assert entry["eager"]["kernel_time"]["by_kind"]["fastmae triton"]["share"] == 0


def test_results_table_shows_the_kernel_benchmark(tmp_path, capsys, charts):
    bench, table = load_benchmark_script("kernels_gpu"), load_results_table_script()
    copy = bench.summarize([1e-3, 1e-3], 2_000_000_000)  # 2000 GB/s
    entry = {"kernel": "add_layer_norm", "model": "ViT-L/16", "precision": "amp", "copy": copy,
             "triton": bench.summarize([1e-3] * 3, 1_500_000_000, copy["gbps_on_floor"]),
             "eager": bench.summarize([2.5e-3] * 3, 1_500_000_000), "compiled": {"error": "RuntimeError: no compiler"}}
    entry["triton"]["speedup_vs_eager"] = 2.5
    report = {"benchmark": "kernels", "environment": environment_info(CPU), "results": [entry]}
    (tmp_path / "kernels.json").write_text(json.dumps(report))
    assert table.main(["--results_dir", str(tmp_path), "--include_cpu"]) == 0
    out = capsys.readouterr().out
    assert "#### Fused kernels, forward + backward" in out
    assert "| add_layer_norm | ViT-L/16 | amp | 1.000 | 2.500 | failed | 1500 | 75.0% | 2.50x | - |" in out
    # the chart: a panel per kernel, GB/s on the floor per implementation, the copy's as the line
    report["config"] = {"batch": 256}
    path = bench.plot_kernels(report, tmp_path / "kernels.png")
    ((panel,), _), = charts
    assert is_png(path) and panel.labels == ["ViT-L/16\namp"] and panel.reference == 2000
    assert [(s.name, s.values, s.notes) for s in panel.series] == [
        ("triton", [1500], ["1500"]), ("eager", [600], ["600"]), ("compiled", [None], ["failed"])]
    # with the chart beside the JSON, the README section shows it
    assert table.main(["--results_dir", str(tmp_path), "--include_cpu"]) == 0
    assert f"![kernels.png]({os.path.relpath(tmp_path, table.README_DIR)}/kernels.png)" in capsys.readouterr().out


def test_bar_chart_rejects_what_it_cannot_draw(tmp_path):
    from fastmae.bench.charts import Panel, Series, write_bar_chart

    panel = Panel(["a", "b"], [Series("x", [1.0, None])], "y")
    assert is_png(write_bar_chart(tmp_path / "ok.png", [panel], "t"))
    with pytest.raises(ValueError, match="PNG"):
        write_bar_chart(tmp_path / "chart.jpg", [panel], "t")
    with pytest.raises(ValueError, match="1 values for 2 labels"):
        write_bar_chart(tmp_path / "bad.png", [Panel(["a", "b"], [Series("x", [1.0])], "y")], "t")
    assert not (tmp_path / "bad.png").exists()


class FakeClock:
    """A stand-in for time.perf_counter that only moves when told to: step times known exactly."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def fake_clock_steps(monkeypatch, durations):
    """(clock, step): each call of ``step`` takes the next of ``durations`` seconds on the patched clock."""
    import fastmae.bench.timing as timing

    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    pending = list(durations)

    def step():
        clock.advance(pending.pop(0))
        return torch.tensor(1.0)

    return clock, step


def test_time_steps_times_only_the_timed_steps_and_summarises_them(monkeypatch):
    """Warm-up steps (slow: compilation) stay out of the timed steps; median, quantiles, spread and img/s
    are those of the timed steps alone."""
    import numpy as np

    timed = [0.4, 0.1, 0.3, 0.2, 5.0]  # one straggler: median and mean differ a lot
    _, step = fake_clock_steps(monkeypatch, [100.0, 50.0] + timed)
    times = time_steps(step, TimingPlan(2, len(timed)), CPU, batch_size=8, progress=False)
    assert times.times_s == pytest.approx(timed)
    assert times.first_step_s == pytest.approx(100.0)
    summary = times.summary()
    median = float(np.median(timed))
    assert summary["median_s"] == pytest.approx(median)
    # img/s is what the steps sustain (the straggler counts), not batch / median
    assert summary["images_per_s"] == pytest.approx(8 * len(timed) / sum(timed)) and summary["mean_s"] == sum(timed) / 5
    assert summary["p10_s"] == pytest.approx(float(np.percentile(timed, 10)))
    assert summary["p90_s"] == pytest.approx(float(np.percentile(timed, 90)))
    assert summary["p10_s"] < summary["median_s"] < summary["p90_s"]
    assert summary["iqr_s"] == pytest.approx(float(np.percentile(timed, 75) - np.percentile(timed, 25)))
    assert summary["relative_spread"] == pytest.approx(
        float(np.percentile(timed, 90) - np.percentile(timed, 10)) / median)
    assert summary["steps"] == len(timed)
    assert (summary["min_s"], summary["max_s"]) == pytest.approx((min(timed), max(timed)))
    # the wall clock spans the timed steps only: 8 images per step over their total time
    assert summary["images_per_s_wall"] == pytest.approx(8 * len(timed) / sum(timed))


def test_measure_contender_mfu_is_training_flops_per_image_times_img_per_s(monkeypatch):
    """MFU = (3 x forward FLOPs per image) x (batch / mean step time) / peak, against both peaks."""
    config = model_config(MICRO)
    flops = train_flops_per_image(config)
    timed = [0.4, 0.1, 0.3, 0.2, 5.0]
    _, step = fake_clock_steps(monkeypatch, [100.0] + timed)
    contender = Contender("x", "test", "fp32", flops, lambda: lambda imgs: step())
    row = measure_contender(contender, iter([None] * 10), TimingPlan(1, len(timed)), CPU, 16,
                            spec_peak=4e9, gemm_peak=1e9, progress=False)
    assert row["step_times_s"] == pytest.approx(timed)
    img_per_s = 16 / statistics.mean(row["step_times_s"])  # sustained: the slow 5 s step counts
    assert row["images_per_s"] == pytest.approx(img_per_s)
    assert row["train_flops_per_image"] == 3 * forward_flops_per_image(config)
    assert row["achieved_flops_per_s"] == pytest.approx(3 * forward_flops_per_image(config) * img_per_s)
    assert row["mfu_measured_gemm"] == pytest.approx(3 * forward_flops_per_image(config) * img_per_s / 1e9)
    assert row["mfu_spec"] == pytest.approx(row["mfu_measured_gemm"] / 4)
    assert row["last_loss"] == 1.0
    # p10-p90 of these times is ten times their 0.3 s median: said, as is an MFU above the GEMM rate
    assert row["warning"].startswith("step times spread 1007% of the median") and "GEMM" not in row["warning"]
    _, step = fake_clock_steps(monkeypatch, [100.0] + [0.2] * 5)
    row = measure_contender(contender, iter([None] * 10), TimingPlan(1, 5), CPU, 16, spec_peak=None,
                            gemm_peak=1e-3 * row["achieved_flops_per_s"], progress=False)
    assert row["warning"] == ("above the GEMM rate measured at the start: the machine's load changed during the "
                              "run, rerun on an idle machine")
    assert "warning: above the GEMM rate" in format_row(row)


def test_a_graphed_contender_is_timed_only_after_its_warm_ups_and_capture():
    """--warmup 1 with a CUDA-graph contender: its 3 eager warm-ups and the capturing step stay untimed."""
    calls = []
    contender = Contender("g", "test", "fp32", 1.0, lambda: lambda imgs: calls.append(1) or torch.ones(()), 4)
    names = ("fastmae", "fastmae+cudagraph", "naive w/[M]+cudagraph")
    assert [c.untimed_steps for c in build_contenders(model_config(MICRO), CPU, torch.float32, 0.75, names)] == [0, 4, 4]
    row = measure_contender(contender, iter([None] * 20), TimingPlan(1, 3), CPU, 2, spec_peak=None, gemm_peak=1e9,
                            progress=False)
    assert row["warmup_steps"] == 4 and row["steps"] == 3 and len(calls) == 7
    row = measure_contender(contender, iter([None] * 20), TimingPlan(6, 3), CPU, 2, spec_peak=None, gemm_peak=1e9,
                            progress=False)
    assert row["warmup_steps"] == 6


def test_speedups_are_ours_over_theirs_like_for_like():
    rows = [{"name": "fastmae", "images_per_s": 600.0}, {"name": "naive w/[M]", "images_per_s": 200.0},
            {"name": "reference-style", "images_per_s": 300.0}, {"name": "hf-vitmae", "images_per_s": 150.0},
            {"name": "fastmae+compile", "images_per_s": 900.0},
            {"name": "naive w/[M]+compile", "images_per_s": 250.0}]
    ips = {r["name"]: r["images_per_s"] for r in rows}
    expected = {f"{a} / {b}": ips[a] / ips[b] for a, b in [
        ("fastmae", "naive w/[M]"), ("fastmae+compile", "naive w/[M]+compile"), ("fastmae", "reference-style"),
        ("fastmae", "hf-vitmae"), ("fastmae+compile", "reference-style"), ("fastmae+compile", "hf-vitmae"),
        ("fastmae+compile", "fastmae")]}
    out = step_cmd.speedups(rows)
    assert out == pytest.approx(expected)
    assert out["fastmae / naive w/[M]"] > 1  # faster is a ratio above 1
    # a failed contender has no ratio; the others keep theirs
    failed = step_cmd.speedups(rows[:1] + [{"name": "naive w/[M]", "error": "x"}] + rows[2:])
    assert "fastmae / naive w/[M]" not in failed and failed["fastmae / reference-style"] == pytest.approx(2.0)


def test_table2_speedups_are_against_the_encoders_mask_token_row(monkeypatch):
    """measured_speedup and flop_limit_speedup of every row divide by the first row of its encoder (w/ [M],
    8 blocks), not by the row before."""
    import argparse

    import fastmae.bench.table2 as table2_cmd

    step_s = [0.9, 0.6, 0.05]  # the last beyond what its FLOPs allow
    seen = []

    def fake_measure(contender, images, plan, device, batch_size, spec_peak, gemm_peak, progress=True):
        seen.append(contender)
        return {"name": contender.name, "mean_s": step_s[len(seen) - 1],
                "train_flops_per_image": contender.train_flops_per_image}

    monkeypatch.setattr(table2_cmd, "measure_contender", fake_measure)
    monkeypatch.setattr(table2_cmd, "format_row", lambda row: "")
    args = argparse.Namespace(warmup=0, steps=1, mask_ratio=0.75, kernels="torch", attn="sdpa", no_progress=True)
    rows = table2_cmd._measure_encoder(table2_rows((MICRO,)), args, CPU, torch.float32, 2, {"flops_per_s": 1.0},
                                       None, None)
    baseline_flops = train_flops_per_image(model_config(MICRO, decoder_depth=8), 0.75, encoder_mask_tokens=True)
    assert [r["measured_speedup"] for r in rows] == pytest.approx([1.0, 0.9 / 0.6, 0.9 / 0.05])
    assert [r["flop_limit_speedup"] for r in rows] == pytest.approx(
        [1.0] + [baseline_flops / train_flops_per_image(model_config(MICRO, decoder_depth=d), 0.75) for d in (8, 1)])
    assert rows[2]["flop_limit_speedup"] > rows[1]["flop_limit_speedup"] > 1
    # faster than fewer FLOPs allow: the baseline was timed slow (a busy machine), and the row says so
    assert [("warning" in r) for r in rows] == [r["measured_speedup"] > 1.2 * r["flop_limit_speedup"] for r in rows]
    assert rows[2]["warning"].startswith("measured 18.00x beyond the FLOP-count limit") and "warning" not in rows[1]


def test_profile_paper_checks_compare_encoder_flops_counted_by_flop_counter():
    """The encoder claim's ratio is that of the patch projection + encoder blocks as flop_counter counts
    them; it holds near 4x (mask ratio 0.75) and fails far from it (mask ratio 0.5: ~2x)."""
    config = model_config("mae_vit_large_patch16")
    counted = {m: profile_cmd.counted_component_flops(config, 0.75, m) for m in (False, True)}
    encoder = {m: counted[m]["patch_embed"] + counted[m]["encoder_blocks"] for m in (False, True)}
    encoder_claim, total_claim, _ = profile_cmd.paper_checks(config, 0.75)
    assert encoder_claim["this_model"] == pytest.approx(encoder[True] / encoder[False], rel=1e-9)
    assert total_claim["this_model"] == pytest.approx(
        sum(counted[True].values()) / sum(counted[False].values()), rel=1e-9)
    assert encoder_claim["holds"] and total_claim["holds"]
    half = profile_cmd.paper_checks(config, 0.5)[0]
    assert half["this_model"] < 2.5 and half["holds"] is False
    # the verdict is this model's against the paper's factor, which is for 75% masking: said beside it
    assert half["note"] == "the paper's factor is for mask ratio 0.75; at 0.5, L/K = 2.00"
    assert encoder_claim["note"] is None and total_claim["note"] is None


def test_profile_flop_table_training_is_three_times_forward_per_component():
    config = model_config(MICRO)
    table = profile_cmd.flop_table(config, 0.75)
    for key, mask_tokens in (("without_mask_tokens", False), ("with_mask_tokens", True)):
        entry = table[key]
        assert entry["train"] == pytest.approx({k: 3 * v for k, v in entry["forward"].items()})
        assert sum(entry["train"].values()) == pytest.approx(train_flops_per_image(config, 0.75, mask_tokens))
        assert entry["train_total"] == pytest.approx(train_flops_per_image(config, 0.75, mask_tokens))


def test_profile_phase_times_add_up(monkeypatch):
    """Encoder time is its forward and backward, decoder and loss likewise; shares of the whole step."""
    phase_s = dict(zip(profile_cmd.PHASES, (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)))

    def fake_step(model, optimizer, imgs, mask_ratio, autocast_dtype, marks):
        t = 0.0
        marks.points["start"] = t
        for phase in profile_cmd.PHASES:
            t += phase_s[phase]
            marks.points[phase] = t

    monkeypatch.setattr(profile_cmd, "profiled_step", fake_step)
    out = profile_cmd.time_phases(None, None, iter([None] * 4), 0.75, None, CPU, warmup=1, steps=3)
    assert out["median_s"] == pytest.approx(phase_s)
    assert out["step_median_s"] == pytest.approx(sum(phase_s.values()))
    assert out["encoder_s"] == pytest.approx(phase_s["forward_encoder"] + phase_s["backward_encoder"])
    assert out["decoder_s"] == pytest.approx(phase_s["forward_decoder"] + phase_s["backward_decoder"])
    assert out["loss_s"] == pytest.approx(phase_s["forward_loss"] + phase_s["backward_loss"])
    assert out["share"]["optimizer"] == pytest.approx(64 / 127)


def test_gemm_rate_counts_two_flops_per_multiply_add(monkeypatch):
    """An n x n by n x n matmul is what FlopCounterMode counts (2 n^3); with every matmul taking one second
    of a fake clock, the rate is exactly that per second."""
    import fastmae.bench.timing as timing
    from torch.utils.flop_counter import FlopCounterMode

    size = 16
    counter = FlopCounterMode(display=False)
    with counter:
        torch.mm(torch.ones(size, size), torch.ones(size, size))
    per_matmul = counter.get_total_flops()
    clock = FakeClock()

    def taking_one_second(matmul):
        def one_second_matmul(*args, **kwargs):
            clock.advance(1.0)
            return matmul(*args, **kwargs)
        return one_second_matmul

    monkeypatch.setattr(timing.time, "perf_counter", clock)
    monkeypatch.setattr(torch, "mm", taking_one_second(torch.mm))
    monkeypatch.setattr(torch.nn.functional, "linear", taking_one_second(torch.nn.functional.linear))
    gemm = measured_gemm_flops(CPU, torch.float32, size=size, repeats=2)
    assert gemm["flops_per_s"] == pytest.approx(per_matmul)


def test_results_tables_show_each_field_in_its_column():
    """Every column of the step, Table 2 and profile tables shows its own field (distinct values)."""
    table = load_results_table_script()
    env = {"device": "GPU X", "device_type": "cuda", "git": {"commit": "abcdef123", "dirty": False}}
    # a skewed run: batch / median said 25600 img/s, the steps sustain 256 x 4 / 0.05 s = 20480
    row = {"name": "fastmae", "images_per_s": 25600.0, "median_s": 0.0100, "p10_s": 0.0090, "p90_s": 0.0125,
           "min_s": 0.0080, "max_s": 0.0300, "peak_memory_bytes": 3 * 2**30, "mfu_spec": 0.40,
           "mfu_measured_gemm": 0.55, "first_step_s": 7.5, "step_times_s": [0.01, 0.01, 0.01, 0.02]}
    naive = {**row, "name": "naive w/[M]", "images_per_s": 5120.0, "median_s": 0.05, "step_times_s": [0.05] * 4}
    step = {"benchmark": "step", "model": "m", "environment": env, "dtype": "bf16", "batch_size": 256,
            "results": [row, naive], "speedups": {"fastmae / naive w/[M]": 5.0}}
    lines = table.step_table([step])
    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    assert (f"| m | GPU X | bf16 | 256 | fastmae | 20480 | {ms(row['median_s'])} "
            f"({ms(row['p10_s'])}-{ms(row['p90_s'])}) | {row['peak_memory_bytes'] / 2**30:.1f} | "
            f"32.0% | 44.0% | {row['first_step_s']:.1f} | abcdef1 |") in lines  # MFU scaled to sustained
    assert "| m | GPU X | fastmae / naive w/[M] | 4.00x |" in lines  # the stored 5.0 was batch / median
    baseline = {"encoder": "enc", "decoder_depth": 8, "encoder_mask_tokens": True, "batch_size": 64,
                "median_s": 0.100, "step_times_s": [0.1, 0.1], "measured_speedup": 1.0, "paper_speedup": 1.0,
                "flop_limit_speedup": 1.0}
    t2row = {"encoder": "enc", "decoder_depth": 1, "encoder_mask_tokens": False, "batch_size": 64,
             "median_s": 0.030, "step_times_s": [0.03, 0.05], "measured_speedup": 3.33, "paper_speedup": 3.7,
             "flop_limit_speedup": 4.19}
    rows = [baseline, t2row]
    lines = table.table2_table([{"benchmark": "table2", "environment": env, "rows": rows}])
    assert "| enc | 1 | no | eager | 64 | 40.0 | 2.50x | 3.7x | 4.19x | GPU X |" in lines  # mean step, sustained
    lines = table.table2_table([{"benchmark": "table2", "environment": env, "rows": rows, "cuda_graph": True}])
    assert "| enc | 1 | no | CUDA graph | 64 | 40.0 | 2.50x | 3.7x | 4.19x | GPU X |" in lines
    compiled = {"scope": "blocks", "mode": "default"}
    lines = table.table2_table([{"benchmark": "table2", "environment": env, "rows": rows, "compile": compiled}])
    assert "| enc | 1 | no | compiled (blocks, default) | 64 | 40.0 | 2.50x | 3.7x | 4.19x | GPU X |" in lines
    halved = {**t2row, "batch_size": 32, "step_times_s": [0.02, 0.02]}  # fell back to half the batch
    lines = table.table2_table([{"benchmark": "table2", "environment": env, "rows": [baseline, halved]}])
    assert "| enc | 1 | no | eager | 32 | 20.0 | 2.50x | 3.7x | 4.19x | GPU X |" in lines
    t = {"step_median_s": 0.2, "encoder_s": 0.1, "decoder_s": 0.05, "loss_s": 0.01,
         "median_s": {"optimizer": 0.03}}
    flops = {"without_mask_tokens": {"train_total": 2e9}, "with_mask_tokens": {"train_total": 6.5e9}}
    lines = table.profile_table([{"benchmark": "profile", "model": "m", "environment": env, "batch_size": 32,
                                  "time": t, "flops_per_image": flops}])
    assert "| m | GPU X | 32 | 200.0 | 50.0% | 25.0% | 5.0% | 15.0% | - | - | - | - | 2 | 6.5 |" in lines
    kinds = {"matmul": {"share": 0.6}, "attention": {"share": 0.1}, "optimizer": {"share": 0.3}}
    lines = table.profile_table([{"benchmark": "profile", "model": "m", "environment": env, "batch_size": 32,
                                  "time": t, "flops_per_image": flops,
                                  "kernel_time": {"by_kind": kinds, "device_busy_fraction": 0.9}}])
    assert "| m | GPU X | 32 | 200.0 | 50.0% | 25.0% | 5.0% | 15.0% | 60.0% | 10.0% | 30.0% | 90.0% | 2 | 6.5 |" in lines


def test_results_record_the_commit_named_by_the_environment(monkeypatch):
    """The GPU machine's copy of the tree carried a stale .git: its results named a commit 115 commits old."""
    from fastmae.bench.environment import GIT_COMMIT_VARIABLE, git_commit

    monkeypatch.delenv(GIT_COMMIT_VARIABLE, raising=False)
    here = git_commit()
    assert here["commit"] and len(here["commit"]) == 40 and "source" not in here
    monkeypatch.setenv(GIT_COMMIT_VARIABLE, "0123456789abcdef0123456789abcdef01234567")
    assert git_commit() == {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": None,
                            "source": GIT_COMMIT_VARIABLE}


def test_results_tables_name_a_runs_non_default_settings_and_link_charts_where_they_are(tmp_path, capsys):
    """Two runs of one model on one day, one with a 4-block decoder at mask ratio 0.5 on real data: the
    table must not show both as the default configuration; charts are linked from where they lie."""
    table = load_results_table_script()
    env = {"device": "GPU X", "device_type": "cuda", "git": {"commit": "abcdef123", "dirty": False}}
    config = dataclasses.asdict(model_config(MICRO, decoder_depth=4))
    run = {"benchmark": "step", "model": MICRO, "config": config, "mask_ratio": 0.5, "data": "real (cpu loader, x)"}
    assert table._model_with_settings(run) == f"{MICRO} (decoder depth 4, mask ratio 0.5, real data)"
    default = {**run, "config": dataclasses.asdict(model_config(MICRO)), "mask_ratio": 0.75, "data": "synthetic"}
    assert table._model_with_settings(default) == MICRO
    results = tmp_path / "elsewhere"
    results.mkdir()
    row = {"name": "fastmae", "images_per_s": 10.0, "median_s": 0.1, "p10_s": 0.1, "p90_s": 0.1, "step_times_s": [0.1]}
    (results / "step_x.json").write_text(json.dumps({**default, "environment": env, "dtype": "fp32", "batch_size": 1,
                                                     "results": [row]}))
    (results / "step_x.png").write_bytes(b"\x89PNG")
    assert table.main(["--results_dir", str(results)]) == 0
    link = os.path.relpath(results, table.README_DIR)
    assert f"![step_x.png]({link}/step_x.png)" in capsys.readouterr().out


def test_redrawn_charts_show_the_sustained_figures_of_the_tables(tmp_path, monkeypatch):
    """The committed charts were drawn at run time from batch / median step time, while the README's tables
    beside them recompute sustained figures: --redraw_charts draws them from the tables' figures."""
    import importlib.util
    import shutil as _shutil
    from pathlib import Path as _Path

    import fastmae.bench.step as step_cmd
    import fastmae.bench.table2 as table2_cmd

    spec = importlib.util.spec_from_file_location("make_results_table", _Path(__file__).parents[1] / "benchmarks" /
                                                  "make_results_table.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    results = _Path(__file__).parents[1] / "benchmarks" / "results"
    # files of 2026-11-24, whose img/s was batch / median step time
    for name in ("step_mae_vit_base_patch16_h100-80gb-hbm3_20261124.json", "table2_h100-80gb-hbm3_20261124.json"):
        _shutil.copy(results / name, tmp_path / name)
    drawn = {}
    monkeypatch.setattr(step_cmd, "plot_step", lambda result, path: drawn.setdefault("step", (result, path))[1])
    monkeypatch.setattr(table2_cmd, "plot_table2", lambda rows, path, title: drawn.setdefault("table2", (rows, path))[1])
    loaded = tables.load_results(tmp_path)
    assert len(tables.redraw_charts(loaded, tmp_path)) == 2
    step_result, step_png = drawn["step"]
    eager = next(r for r in step_result["results"] if r["name"] == "fastmae")
    assert step_png == tmp_path / "step_mae_vit_base_patch16_h100-80gb-hbm3_20261124.png"
    steps = [r for r in loaded if r["benchmark"] == "step"]
    assert f"| {eager['images_per_s']:.0f} |" in "\n".join(tables.step_table(steps)) and round(eager["images_per_s"]) == 3578
    rows, _ = drawn["table2"]
    assert [round(r["measured_speedup"], 2) for r in rows if not r["encoder_mask_tokens"]] == [2.30, 3.01, 2.40, 2.57]


def test_the_engines_fp16_step_scales_its_loss_as_pretrain_does():
    """fastmae's and the naive baseline's rows skipped the GradScaler in fp16 (and its overflow check), while
    the reference-style row paid for it and `fastmae pretrain --precision fp16` runs it."""
    from fastmae.bench.contenders import build_contenders, fastmae_step

    config = model_config(MICRO)
    for dtype, scaled in ((torch.float16, True), (torch.bfloat16, False), (torch.float32, False)):
        step = fastmae_step(config, CPU, dtype, 0.75)
        assert step.loss_scaler.is_enabled() == scaled, dtype
    rows = build_contenders(config, CPU, torch.float16, 0.75, ("fastmae", "naive w/[M]", "reference-style"))
    assert [r.precision for r in rows] == ["float16 autocast + GradScaler"] * 2 + ["fp16 autocast + GradScaler"]
    fp32 = build_contenders(config, CPU, torch.float32, 0.75, ("reference-style",))[0]
    assert "GradScaler" not in fp32.description
