"""The benchmark commands' handling of what users give them: output files, bad flags, stops."""

import json

import pytest
import torch

from fastmae.bench.environment import ResultFile, write_new_json
from fastmae.cli import main
from test_bench import one_thread  # noqa: F401  (autouse: timing on a shared 2-core machine, one thread)

MICRO = "mae_vit_micro_patch4"
QUICK_STEP = ["bench", "step", "--model", MICRO, "--impl", "fastmae", "--batch_size", "2", "--warmup", "0",
              "--steps", "1", "--gemm_size", "64", "--no_progress"]
QUICK_TABLE2 = ["bench", "table2", "--models", MICRO, "--batch_size", "2", "--warmup", "0", "--steps", "1",
                "--no_progress"]
QUICK_PROFILE = ["profile", "--model", MICRO, "--batch_size", "2", "--warmup", "0", "--steps", "1",
                 "--kernel_table", "0"]




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
    assert any(f.startswith(f"step_{MICRO}_batch2_impl-fastmae_dec2_mask0.5_cpu_") for f in names(tmp_path))


def test_bench_step_names_a_run_of_other_contenders():
    from fastmae.bench.step import contenders_tag

    default = ("fastmae", "naive w/[M]", "reference-style", "hf-vitmae")
    assert contenders_tag(default, default) == ""
    assert contenders_tag(default[:3], default) == "_nohf"
    assert contenders_tag(("fastmae", "naive w/[M]+compile"), default) == "_impl-fastmae_naive-w-M-compile"


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


# ---- 6. the profile's kernel table is printed once ----
def test_profile_prints_the_kernel_table_once(tmp_path, capsys):
    path = tmp_path / "p.json"
    assert main(QUICK_PROFILE[:-1] + ["3", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("Device time by kind") == 1 and path.with_suffix(".png").exists()


# ---- 7. user mistakes and stops end in a message, not a traceback ----
def test_profile_triton_kernels_on_cpu_without_the_interpreter_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(QUICK_PROFILE + ["--kernels", "triton"]) == 2
    err = capsys.readouterr().err
    assert "fastmae profile: error: --kernels triton:" in err and "TRITON_INTERPRET=1" in err


@pytest.mark.parametrize("flags, message", [
    (["--gemm_size", "0"], "--gemm_size must be positive, got 0"),
    (["--attn", "xformers"], "--attn xformers:"),
])
def test_bench_step_refuses_engine_and_gemm_flags_before_measuring(capsys, no_measuring, flags, message):
    import importlib.util

    if flags[0] == "--attn" and importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    assert main(QUICK_STEP + flags) == 2
    assert f"fastmae bench step: error: {message}" in capsys.readouterr().err


def test_bench_table2_refuses_a_missing_attention_backend(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    assert main(["bench", "table2", "--small", "--attn", "xformers", "--json", str(tmp_path / "t.json")]) == 2
    assert "fastmae bench table2: error: --attn xformers: attention backend 'xformers'" in capsys.readouterr().err
    assert names(tmp_path) == []


def failing_at(label_part: str, error: Exception, measure):
    """``measure`` that raises ``error`` for the rows whose label contains ``label_part``."""
    def measure_or_fail(contender, *args, **kwargs):
        if label_part in contender.name:
            raise error
        return measure(contender, *args, **kwargs)

    return measure_or_fail


def test_table2_keeps_the_rows_measured_before_a_failing_row(tmp_path, capsys, monkeypatch):
    import fastmae.bench.table2 as table2_cmd
    from fastmae.bench.table2 import table2_rows

    monkeypatch.setattr(table2_cmd, "measure_contender",
                        failing_at("decoder depth 1", RuntimeError("no kernel for this shape"), table2_cmd.measure_contender))
    path = tmp_path / "t2.json"
    assert main(QUICK_TABLE2 + ["--json", str(path)]) == 1
    out, err = capsys.readouterr()
    rows = table2_rows((MICRO,))
    result = json.loads(path.read_text())
    assert [r["label"] for r in result["rows"]] == [rows[0].label, rows[1].label]
    assert result["errors"] == [{"encoder": MICRO, "row": rows[2].label, "batch_size": 2,
                                 "error": "RuntimeError: no kernel for this shape"}]
    assert result["complete"] is False and result["pending"] == [rows[2].label]
    assert rows[1].label in out and path.with_suffix(".png").exists()  # the table and chart of what was measured
    assert f"fastmae bench table2: error: {rows[2].label}: RuntimeError: no kernel for this shape" in err
    assert "Traceback" not in err


def stopped_after_one_call(real, calls: list):
    """``real`` for its first call, then a Ctrl-C (KeyboardInterrupt); ``calls`` holds one entry per call made."""
    def measure_then_stop(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    return measure_then_stop


def test_bench_step_stopped_says_where_its_partial_result_is(tmp_path, capsys, monkeypatch):
    import fastmae.bench.step as step_cmd

    calls = []
    monkeypatch.setattr(step_cmd, "measure_contender", stopped_after_one_call(step_cmd.measure_contender, calls))
    path = tmp_path / "s.json"
    command = QUICK_STEP[:QUICK_STEP.index("--impl") + 1] + ["fastmae,naive w/[M]"] + QUICK_STEP[QUICK_STEP.index("--impl") + 2:]
    assert main(command + ["--json", str(path)]) == 130
    out, err = capsys.readouterr()
    assert f"fastmae bench step: stopped while measuring {MICRO}; what it measured is in {path} (complete: false)" in err
    assert f"wrote {path.with_suffix('.png')}" in out and path.with_suffix(".png").exists()
    assert json.loads(path.read_text())["pending"] == ["fastmae"] and "Traceback" not in err
    calls.append(1)  # stopped at the first contender: nothing to keep
    assert main(command + ["--out_dir", str(tmp_path / "d")]) == 130
    assert "stopped while measuring" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_bench_data_stopped_keeps_what_it_measured(tmp_path, capsys, monkeypatch):
    import fastmae.data.bench as data_bench
    from fastmae.data.synthetic import write_jpeg_folder

    write_jpeg_folder(tmp_path / "jpegs", 12, num_classes=2)
    calls = []
    monkeypatch.setattr(data_bench, "measure", stopped_after_one_call(data_bench.measure, calls))
    path, chart = tmp_path / "data.json", tmp_path / "data.png"
    assert main(["bench", "data", "--data_path", str(tmp_path / "jpegs"), "--loaders", "cpu", "--batch_size", "4",
                 "--input_size", "32", "--num_threads", "1", "--warmup", "1", "--json", str(path),
                 "--plot", str(chart)]) == 130
    out, err = capsys.readouterr()
    report = json.loads(path.read_text())
    assert report["complete"] is False and [(r["loader"], r["mode"]) for r in report["results"]] == [("cpu", "decode")]
    assert report["pending"] == ["cpu augment"]  # what the stop left unmeasured, as bench step's files say
    assert f"fastmae bench data: stopped; the measurements made are in {path} (complete: false)" in err
    assert chart.read_bytes()[:4] == b"\x89PNG" and "Traceback" not in err and "cpu" in out


# ---- 8. table2 on out-of-memory: the batch is halved by default; otherwise what was measured is shown ----
def test_table2_halves_the_batch_on_out_of_memory_by_default(tmp_path, capsys, monkeypatch):
    import fastmae.bench.table2 as table2_cmd
    from fastmae.bench.measure import BatchTooLarge

    measure = table2_cmd.measure_contender

    def memory_for_two(contender, images, plan, device, batch_size, *args, **kwargs):
        if batch_size > 2:
            raise BatchTooLarge(f"{contender.name}: out of memory at batch {batch_size}")
        return measure(contender, images, plan, device, batch_size, *args, **kwargs)

    monkeypatch.setattr(table2_cmd, "measure_contender", memory_for_two)
    path = tmp_path / "t2.json"
    assert main(QUICK_TABLE2[:QUICK_TABLE2.index("--batch_size")] + ["--batch_size", "8"]
                + QUICK_TABLE2[QUICK_TABLE2.index("--batch_size") + 2:] + ["--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["batch_size_requested"] == 8 and result["oom_fallback"] is True and result["complete"] is True
    assert [r["batch_size"] for r in result["rows"]] == [2, 2, 2]
    assert "again at batch 4" in capsys.readouterr().out


def test_table2_without_oom_fallback_still_shows_what_it_measured(tmp_path, capsys, monkeypatch):
    import fastmae.bench.table2 as table2_cmd
    from fastmae.bench.measure import BatchTooLarge
    from fastmae.bench.table2 import table2_rows

    out_of_memory = BatchTooLarge("out of memory at batch 2")
    monkeypatch.setattr(table2_cmd, "measure_contender",
                        failing_at("decoder depth 1", out_of_memory, table2_cmd.measure_contender))
    path = tmp_path / "t2.json"
    assert main(QUICK_TABLE2 + ["--no_oom_fallback", "--json", str(path)]) == 1
    out, err = capsys.readouterr()
    rows = table2_rows((MICRO,))
    assert rows[0].label in out and rows[1].label in out and path.with_suffix(".png").exists()
    assert "out of memory at batch 2 (try a smaller --batch_size, or leave out --no_oom_fallback)" in err
    result = json.loads(path.read_text())
    assert [r["label"] for r in result["rows"]] == [rows[0].label, rows[1].label] and result["oom_fallback"] is False
    with pytest.raises(SystemExit):  # one or the other
        main(QUICK_TABLE2 + ["--oom_fallback", "--no_oom_fallback"])


@pytest.mark.parametrize("json_name, plot_name, message", [
    ("d.png", "d.png", "--plot and --json name the same file"),
    ("d.json", "d.json", "--plot {plot}: the chart is a PNG; name it .png"),
])
def test_bench_data_chart_never_takes_the_results_place(tmp_path, capsys, json_name, plot_name, message):
    path, plot = tmp_path / json_name, tmp_path / plot_name
    assert main(["bench", "data", "--json", str(path), "--plot", str(plot)]) == 2
    assert message.format(plot=plot) in capsys.readouterr().err and names(tmp_path) == []


# ---- 9. bench data times a bounded number of batches by default ----
def test_bench_data_times_50_batches_by_default_and_refuses_negative_batches(tmp_path, capsys):
    from fastmae.cli import build_parser
    from fastmae.data.synthetic import write_jpeg_folder

    parser, _ = build_parser(["bench", "data"])
    assert parser.parse_args(["bench", "data"]).batches == 50  # not a whole epoch of --data_path
    write_jpeg_folder(tmp_path / "jpegs", 56, num_classes=2)
    path = tmp_path / "d.json"
    command = ["bench", "data", "--data_path", str(tmp_path / "jpegs"), "--loaders", "cpu", "--modes", "decode",
               "--batch_size", "1", "--input_size", "32", "--num_threads", "1", "--warmup", "1"]
    assert main(command + ["--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["timed_batches_asked"] == 50 and report["results"][0]["timed_batches"] == 50  # of 54 after warm-up
    assert main(command + ["--batches", "-1"]) == 2
    assert "--batches and --warmup must be >= 0 (--batches 0: one epoch), got --batches -1" in capsys.readouterr().err


# ---- 10. a FLOP cut larger than the paper's bears its claim out ----
def test_profile_flop_cut_claims_hold_at_90_percent_of_the_papers_factor_or_more():
    from fastmae.bench import profile as profile_cmd
    from fastmae.bench.measure import model_config

    tiny_encoder = profile_cmd.paper_checks(model_config("mae_vit_tiny_patch16"), 0.75)[0]
    assert tiny_encoder["this_model"] > 4.4 and tiny_encoder["holds"] is True
    large = model_config("mae_vit_large_patch16")
    more_masked = profile_cmd.paper_checks(large, 0.8)[:2]  # encoder ~5x, total ~4x: more than the paper's
    assert [c["this_model"] > 1.1 * c["paper"] for c in more_masked] == [True, True]
    assert [c["holds"] for c in more_masked] == [True, True]
    short = profile_cmd.paper_checks(large, 0.7)  # encoder ~3.3x: more than 10% short of ~4x
    assert short[0]["this_model"] < 0.9 * 4.0 and short[0]["holds"] is False and short[1]["holds"] is False
