"""The Triton kernels compile for the GPUs they are written for (H100 sm_90, A100 sm_80), on CPU.

The interpreter tests check what the kernels compute; these check that the very kernels and
configs a training step launches on a GPU get through Triton's NVIDIA pipeline and ptxas, and what
they cost there: no register spills, shared memory within the device's limit. They run in a fresh
process because this test session has switched the interpreter on (conftest), and an interpreted
kernel cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

KERNELS = {  # both routes of the encoder input's GEMM: cuBLAS + epilogue kernel, fused Triton GEMM
    "_position_epilogue_kernel", "_visible_patch_embed_fwd_kernel", "_patch_rows_kernel", "_decoder_unshuffle_fwd_kernel",
    "_decoder_unshuffle_bwd_kernel", "_masked_patch_loss_kernel", "_add_layer_norm_fwd_kernel",
    "_add_layer_norm_bwd_kernel",
}


def run_compiled(args: list[str] | None = None, code: str | None = None, timeout: int = 900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton >= 3.9 warns when unset; 1 is the GPU default
    cmd = [sys.executable, "-m", "fastmae", *args] if code is None else [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sm90_step(tmp_path_factory):
    """Every kernel of a training step of ViT-B/16 and ViT-H/14 (patch 14: padded rows), bf16 and fp32."""
    out = tmp_path_factory.mktemp("kernels") / "sm90.json"
    proc = run_compiled(["kernels", "compile", "--model", "mae_vit_base_patch16", "mae_vit_huge_patch14",
                         "--arch", "90", "--precision", "bf16", "fp32", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_kernel_compiles_for_sm90(sm90_step):
    result, stdout = sm90_step
    records = result["kernels"]
    for model in ("mae_vit_base_patch16", "mae_vit_huge_patch14"):
        for precision in ("bf16", "fp32"):
            names = {r["name"] for r in records if r["model"] == model and r["precision"] == precision}
            assert names == KERNELS, (model, precision, names)
    assert all(r["arch"] == 90 and r["registers"] is not None for r in records)
    # the naive baseline projects every patch (ALL_PATCHES), training only the kept ones
    assert {r["constants"]["ALL_PATCHES"] for r in records if r["name"] == "_visible_patch_embed_fwd_kernel"} \
        == {True, False}
    assert "visible_patch_embed_fwd_kernel naive     ALL_PATCHES" in stdout and "0 with register spills" in stdout


def test_no_kernel_spills_registers_or_overflows_shared_memory(sm90_step):
    """bf16 and fp32 alike: fp32 without TF32 makes the GEMM an FMA loop, which gets its own thin-K
    tiles (K = 64 tiles had spilled up to 5.6 KB per thread on sm_80)."""
    records = sm90_step[0]["kernels"]
    spilling = [(r["name"], r["precision"], r["tiles"], r["num_warps"], r["spill_bytes"]) for r in records
                if r["spill_bytes"]]
    assert not spilling, f"register spills (bytes per thread): {spilling}"
    refused = [(r["name"], r["tiles"], r["refusal"]) for r in records if not r["fits"]]
    assert not refused, refused
    assert all(r["shared_bytes"] <= r["max_shared_bytes"] for r in records)


def test_norm_kernels_leave_room_for_many_warps_per_sm(sm90_step):
    """Memory-bound: latency is hidden by warps in flight. Wider tiles once took the backward to 174
    registers per thread at ViT-L's width, 8 warps per SM; the one-row tiles stay under 64 (>= 32 warps)."""
    norms = [r for r in sm90_step[0]["kernels"] if r["name"].startswith("_add_layer_norm")]
    assert {r["name"] for r in norms} == {"_add_layer_norm_fwd_kernel", "_add_layer_norm_bwd_kernel"}
    heavy = [(r["model"], r["name"], r["tiles"], r["registers"]) for r in norms if r["registers"] > 64]
    assert not heavy, heavy


def test_memory_bound_kernels_never_move_one_half_precision_value_at_a_time(sm90_step):
    """The loss, the unshuffle and the norms stream bf16 rows: 16-bit loads or stores there (as ViT-H's
    588-value rows once gave the loss) mean one instruction per value."""
    records = sm90_step[0]["kernels"]
    streaming = [r for r in records if r["name"] in ("_masked_patch_loss_kernel", "_decoder_unshuffle_fwd_kernel",
                                                     "_decoder_unshuffle_bwd_kernel", "_add_layer_norm_fwd_kernel",
                                                     "_add_layer_norm_bwd_kernel")]
    assert streaming and all(r["memory_instructions"].get("LDG") for r in streaming)
    narrow = [(r["model"], r["name"], r["memory_instructions"]) for r in streaming
              if any(int(bits) < 32 for widths in r["memory_instructions"].values() for bits in widths)]
    assert not narrow, narrow
    for r in streaming:  # the rows themselves move in 64- or 128-bit vectors (a loss without gradient stores one sum)
        if r["constants"].get("COMPUTE_GRAD") is False:
            continue
        assert max(int(bits) for bits in r["memory_instructions"]["STG"]) >= 64, (r["model"], r["name"])


def test_the_gemm_autotunes_over_several_configs_and_tf32_follows_torch(sm90_step):
    records = sm90_step[0]["kernels"]
    gemm = [r for r in records if r["name"] == "_visible_patch_embed_fwd_kernel"
            and r["model"] == "mae_vit_base_patch16" and r["workload"] == "train" and not r["norm_pix_loss"]]
    by_precision = {p: [r for r in gemm if r["precision"] == p] for p in ("bf16", "fp32")}
    assert len(by_precision["bf16"]) >= 4 and len(by_precision["fp32"]) >= 4
    assert {r["constants"]["DOT_PRECISION"] for r in by_precision["fp32"]} == {"ieee"}  # torch's default: no TF32
    # each GEMM kind autotunes over its own tiles: thin K steps for FMA, K = 64 for tensor cores
    assert {r["tiles"]["BLOCK_K"] for r in by_precision["bf16"]} == {64}
    assert max(r["tiles"]["BLOCK_K"] for r in by_precision["fp32"]) <= 32


def test_a100_compiles_too(tmp_path):
    out = tmp_path / "sm80.json"
    proc = run_compiled(["kernels", "compile", "--model", "mae_vit_base_patch16", "--arch", "80",
                         "--precision", "bf16", "fp32", "--workload", "train", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = json.loads(out.read_text())["kernels"]
    assert {r["arch"] for r in records} == {80}
    assert {r["name"] for r in records} == KERNELS
    assert all(r["fits"] and r["shared_bytes"] <= 166912 for r in records)
    assert not [r for r in records if r["spill_bytes"]]


def test_compile_only_driver_refuses_what_a_gpu_refuses_and_cleans_up():
    """A config whose shared memory exceeds the device's is refused and skipped by the autotuner;
    after the driver exits, CPU tensors are refused again and the autotuner forgets its untimed pick."""
    code = """
        import pytest, torch, triton
        from fastmae.kernels import encoder_input as E
        from fastmae.kernels.cross_compile import CompileOnlyDriver, active_compile_only_driver

        # bf16 A and B tiles of 128 x 128, 3 buffered stages: 192 KiB of shared memory, the A100 has 163
        big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=4)
        small = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=2)
        E._visible_patch_embed_fwd_kernel.configs = [big, small]
        bf16 = torch.bfloat16
        imgs, weight = torch.randn(16, 3, 32, 32), torch.randn(64, 3, 16, 16, dtype=bf16)
        args = (imgs, None, weight, torch.zeros(64, dtype=bf16), torch.zeros(1, 5, 64), torch.zeros(1, 1, 64), 16)
        with CompileOnlyDriver(80) as gpu, E.gemm_route("triton"):  # the autotuned route
            assert active_compile_only_driver() is gpu
            E.visible_patch_embed_forward(*args)
        assert active_compile_only_driver() is None
        by_tiles = {r.tiles["BLOCK_M"]: r for r in gpu.compiled if r.name == "_visible_patch_embed_fwd_kernel"}
        assert not by_tiles[128].fits and "shared memory" in by_tiles[128].refusal, by_tiles[128]
        assert by_tiles[128].registers is None  # refused before loading, as CUDA would
        assert by_tiles[64].fits and by_tiles[64].registers > 0
        assert E._visible_patch_embed_fwd_kernel.cache == {}
        with pytest.raises(ValueError, match="need CUDA tensors"):
            E.visible_patch_embed_forward(*args)
        with pytest.raises(ValueError, match="arch must be one of"):
            CompileOnlyDriver(75)
        print("ok")
    """
    proc = run_compiled(code=code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]


def test_compile_command_refuses_the_interpreter_and_unknown_models():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "fastmae", "kernels", "compile", "--model", "mae_vit_base_patch16"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stderr
    proc = run_compiled(["kernels", "compile", "--model", "vit_nonsense"])
    assert proc.returncode == 2 and "unknown model 'vit_nonsense'" in proc.stderr
