"""The benchmark commands' handling of what users give them: output files, bad flags, stops."""

import json

import pytest
import torch

from fastmae.bench.environment import ResultFile, write_new_json
from fastmae.cli import main

MICRO = "mae_vit_micro_patch4"
QUICK_STEP = ["bench", "step", "--model", MICRO, "--impl", "fastmae", "--batch_size", "2", "--warmup", "0",
              "--steps", "1", "--gemm_size", "64", "--no_progress"]
QUICK_TABLE2 = ["bench", "table2", "--models", MICRO, "--batch_size", "2", "--warmup", "0", "--steps", "1",
                "--no_progress"]
QUICK_PROFILE = ["profile", "--model", MICRO, "--batch_size", "2", "--warmup", "0", "--steps", "1",
                 "--kernel_table", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    """Timing on a shared 2-core machine: two OpenMP threads fighting other jobs are much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def names(folder) -> list[str]:
    return sorted(f.name for f in folder.iterdir())


# ---- 1. --out_dir never replaces an earlier result ----
def test_write_new_json_takes_the_first_free_name(tmp_path):
    first = write_new_json(tmp_path / "r.json", {"run": 1})
    second = write_new_json(tmp_path / "r.json", {"run": 2})
    (tmp_path / "r_3.png").write_bytes(b"an earlier run's chart")  # its JSON was deleted: the name is still taken
    fourth = write_new_json(tmp_path / "r.json", {"run": 4})
    assert (first.name, second.name, fourth.name) == ("r.json", "r_2.json", "r_4.json")
    assert [json.loads((tmp_path / n).read_text())["run"] for n in ("r.json", "r_2.json", "r_4.json")] == [1, 2, 4]
    assert names(tmp_path) == ["r.json", "r_2.json", "r_3.png", "r_4.json"]  # no temporary file left


def test_result_file_takes_a_name_once_then_rewrites_it(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    output = ResultFile(None, str(tmp_path), "x.json")
    assert output.write({"rows": 1}).name == "x_2.json"
    assert output.write({"rows": 2}).name == "x_2.json"  # the run's later saves: its own file
    assert output.chart.name == "x_2.png"
    assert json.loads((tmp_path / "x_2.json").read_text()) == {"rows": 2} and (tmp_path / "x.json").read_text() == "{}"
    named = ResultFile(str(tmp_path / "x.json"), None, "unused")
    assert named.write({"mine": True}).name == "x.json"  # --json: the user named the file to write
    assert not ResultFile(None, None, "x.json")


def test_bench_step_out_dir_keeps_every_run(tmp_path, capsys):
    for _ in range(2):
        assert main(QUICK_STEP + ["--out_dir", str(tmp_path)]) == 0
    files = names(tmp_path)
    assert len(files) == 4 and [f for f in files if f.endswith(".json")][1].endswith("_2.json")
    assert capsys.readouterr().out.count("_2.json") == 1  # the second run says where it wrote
    # settings other than the defaults are in the name
    assert main(QUICK_STEP + ["--out_dir", str(tmp_path), "--decoder_depth", "2", "--mask_ratio", "0.5"]) == 0
    assert any(f.startswith(f"step_{MICRO}_batch2_dec2_mask0.5_cpu_") for f in names(tmp_path))


def test_bench_table2_and_profile_out_dir_keep_every_run(tmp_path):
    for _ in range(2):
        assert main(QUICK_TABLE2 + ["--out_dir", str(tmp_path / "t2")]) == 0
        assert main(["profile", "--model", MICRO, "--flops_only", "--out_dir", str(tmp_path / "p")]) == 0
    for folder in ("t2", "p"):
        files = names(tmp_path / folder)
        assert len(files) == 4 and sum(f.endswith("_2.json") or f.endswith("_2.png") for f in files) == 2
        assert all(json.loads((tmp_path / folder / f).read_text()) for f in files if f.endswith(".json"))


# ---- 2. the chart never takes the JSON's place ----
@pytest.mark.parametrize("command", [QUICK_STEP, QUICK_TABLE2, QUICK_PROFILE])
def test_a_json_path_ending_in_png_is_refused_up_front(tmp_path, capsys, command):
    path = tmp_path / "result.PNG"
    assert main(command + ["--json", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--json" in err and ".png" in err and "Traceback" not in err
    assert names(tmp_path) == []


# ---- 3. --real_data's flags are checked before anything is measured ----
@pytest.fixture
def no_measuring(monkeypatch):
    """Fails the test if the GEMM rate is measured: every check here must come before it."""
    import fastmae.bench.step as step_cmd

    def measured(*args, **kwargs):
        raise AssertionError("measured before the flags were checked")

    monkeypatch.setattr(step_cmd, "measured_gemm_flops", measured)


@pytest.mark.parametrize("flags, message", [
    (["--real_data", "--data_path", "/nonexistent/images"], "--data_path /nonexistent/images does not exist"),
    (["--real_data", "--num_workers", "-1"], "--num_workers must be >= 0, got -1"),
    (["--real_data", "--data_loader", "dali"], "--data_loader dali reads image files: give --data_path"),
    (["--data_path", "/tmp"], "--data_path given without --real_data"),
    (["--num_workers", "2"], "--num_workers given without --real_data"),
    (["--decoder_depth", "-1"], "--decoder_depth must be >= 0, got -1"),
])
def test_bench_step_refuses_bad_flags_before_measuring(capsys, no_measuring, flags, message):
    assert main(QUICK_STEP + flags) == 2
    err = capsys.readouterr().err
    assert f"fastmae bench step: error: {message}" in err and "Traceback" not in err


def test_bench_step_data_loader_choices(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(QUICK_STEP + ["--real_data", "--data_loader", "foo"])
    assert stopped.value.code == 2
    assert "--data_loader: invalid choice: 'foo'" in capsys.readouterr().err


def test_bench_step_real_data_folder_without_images_is_a_clear_error(tmp_path, capsys):
    assert main(QUICK_STEP + ["--real_data", "--data_path", str(tmp_path), "--num_workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "fastmae bench step: error: --real_data:" in err and "no image files" in err and "Traceback" not in err


# ---- 4. depths and widths out of range ----
def test_profile_refuses_a_negative_decoder_depth(tmp_path, capsys):
    path = tmp_path / "p.json"
    assert main(["profile", "--model", MICRO, "--flops_only", "--decoder_depth", "-1", "--json", str(path)]) == 2
    assert "fastmae profile: error: --decoder_depth must be >= 0, got -1" in capsys.readouterr().err
    assert not path.exists()
    assert main(["profile", "--model", MICRO, "--flops_only", "--decoder_depth", "0", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["flops_per_image"]["without_mask_tokens"]["forward"]["decoder_blocks"] == 0


@pytest.mark.parametrize("size, value, message", [
    ("decoder_depth", -1, "decoder_depth must be >= 0, got -1"),
    ("depth", -3, "depth must be >= 0, got -3"),
    ("embed_dim", 0, "embed_dim must be positive, got 0"),
    ("decoder_num_heads", 0, "decoder_num_heads must be positive, got 0"),
    ("patch_size", -4, "patch_size must be positive, got -4"),
])
def test_model_refuses_sizes_out_of_range(size, value, message):
    from fastmae.models import create_model

    with pytest.raises(ValueError, match=message):
        create_model(MICRO, **{size: value})
    assert len(create_model(MICRO, decoder_depth=0).decoder_blocks) == 0  # no decoder blocks is a model


# ---- 5. the measured GEMM rate bounds the model's matmuls ----
def linear_rate(dtype: torch.dtype, size: int, calls: int = 5) -> float:
    """FLOP/s of the model's own matmul (F.linear, as nn.Linear runs it), best single call."""
    import time

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.nn.functional.linear(a, b)
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gemm_rate_is_at_least_what_the_models_matmul_reaches(dtype):
    """On CPU, fp16 torch.mm(out=) ran 20x slower than F.linear: MFU against it read 474%. The measured
    rate is the fastest of the step's matmul layouts, so F.linear's rate cannot exceed it (half of it:
    the slack of a busy shared machine)."""
    from fastmae.bench.gemm_peak import GEMM_LAYOUTS, measured_gemm_flops

    gemm = measured_gemm_flops(torch.device("cpu"), dtype, size=512, repeats=2)
    assert gemm["flops_per_s"] >= 0.5 * linear_rate(dtype, 512)
    assert set(gemm["per_layout_flops_per_s"]) == set(GEMM_LAYOUTS)
    assert gemm["flops_per_s"] == max(gemm["per_layout_flops_per_s"].values())
    assert gemm["layout"] in GEMM_LAYOUTS
