"""Markdown tables for the README from the committed results in benchmarks/results/*.json.

    python benchmarks/make_results_table.py [--results_dir DIR] [--include_cpu] [--redraw_charts]

Step benchmarks become one table (img/s, step time, peak memory, MFU per implementation), Table 2
runs another (measured speed-up beside the paper's and the FLOP-count limit), profiles a third
(encoder / decoder / loss share of the step), the fused-kernel benchmark a fourth (time against
eager and compiled PyTorch, bandwidth against a copy), the data-loader benchmark a fifth (img/s
beside what ViT-B training consumes), and ``fastmae pretrain``'s summary.json files a sixth (img/s
and time waiting for data). Runs stopped part-way are marked with what they miss. Each section
links the charts (.png) written beside its JSON files. CPU results are left out unless asked for:
they only show that the code runs. With no result files it says so.

Files written before 2026-11-25 hold img/s (and the MFU and speed-ups made from it) as batch / median
step time; the tables recompute every figure as sustained, from the step times each file records.
``--redraw_charts`` redraws the step and Table 2 charts from the same sustained figures, so that a
chart shows what the table beside it says.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README_DIR = Path(__file__).resolve().parent.parent  # chart links are relative to the README


def load_results(results_dir: Path, include_cpu: bool = False) -> list[dict]:
    results = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(result, dict) or "benchmark" not in result:
            continue  # not one of ours
        if not isinstance(result.get("environment"), dict):  # every benchmark command writes it first
            raise ValueError(f"{path} is not a whole result file (no 'environment' record): move it out of "
                             f"{results_dir}, or run its benchmark again")
        if result.get("environment", {}).get("device_type") == "cpu" and not include_cpu:
            continue
        result["_file"] = path.name
        chart = path.with_suffix(".png")  # written beside the JSON by every benchmark command
        result["_chart"] = chart.name if chart.is_file() else None
        results.append(result)
    return results


def _pct(value) -> str:
    return f"{100 * value:.1f}%" if value is not None else "-"


def _seconds(value) -> str:
    return f"{value:.1f}" if value is not None else "-"


def _gib(value) -> str:
    return f"{value / 2**30:.1f}" if value is not None else "-"


def _commit(result: dict) -> str:
    git = result.get("environment", {}).get("git", {})
    commit = (git.get("commit") or "?")[:7]
    return commit + ("+" if git.get("dirty") else "")


def sustained_images_per_s(row: dict, batch_size: int) -> float:
    """The timed steps' images over their total time, from the recorded step times. Results written before
    2026-11-25 reported batch / median step time as ``images_per_s``, which overstated runs whose steps
    were skewed by slow ones; recomputing keeps every table on the one definition."""
    times = row.get("step_times_s")
    return batch_size * len(times) / sum(times) if times else row["images_per_s"]


def mean_step_s(row: dict) -> float:
    times = row.get("step_times_s")
    return sum(times) / len(times) if times else row.get("mean_s", row["median_s"])


def _scaled(value, factor: float):
    return value * factor if value is not None else None


def _step_row_name(result: dict, row: dict) -> str:
    """A row's name with the settings that are not the defaults: compile scope and mode for compiled
    rows; kernels and attention backend for the rows of fastmae's engine (fastmae, naive w/[M])."""
    settings = []
    compiled = result.get("compile") or {}
    scope, mode = compiled.get("scope", "model"), compiled.get("mode", "default")
    if "+compile" in row["name"] and (scope, mode) != ("model", "default"):
        settings += [scope, mode]
    if row["name"] == "reference-style" and "for-loop AdamW" in row.get("description", ""):
        settings.append("for-loop AdamW")  # before 2026-11-25; now torch's default, as the reference gets
    if row["name"].startswith(("fastmae", "naive")):
        if result.get("kernels", "auto") != "auto":
            settings.append(f"kernels {result['kernels']}")
        if result.get("attn", "sdpa") != "sdpa":
            settings.append(f"attn {result['attn']}")
    return f"{row['name']} ({', '.join(settings)})" if settings else row["name"]


def step_speedups(result: dict) -> dict:
    """The run's img/s ratios (the pairs ``fastmae bench step`` chose), from sustained img/s."""
    rate = {row["name"]: sustained_images_per_s(row, result["batch_size"]) for row in result["results"]
            if "error" not in row}
    out = {}
    for pair in result.get("speedups", {}):
        ours, theirs = pair.split(" / ")
        if ours in rate and theirs in rate:
            out[pair] = rate[ours] / rate[theirs]
    return out


DEFAULT_MASK_RATIO = 0.75


def _model_with_settings(result: dict) -> str:
    """The model's name, with what the run changed from its named configuration (another decoder, mask
    ratio or image size) and real data, so that such a run is not read as the default one."""
    settings = []
    config = result.get("config") or {}
    try:
        from fastmae.bench.measure import model_config
        named = dataclasses.asdict(model_config(result["model"]))
    except (ImportError, ValueError):  # fastmae not importable, or a name it does not know
        named = {}
    for key, label in (("decoder_depth", "decoder depth"), ("decoder_embed_dim", "decoder width"),
                       ("img_size", "image size")):
        if key in config and key in named and config[key] != named[key]:
            settings.append(f"{label} {config[key]}")
    if result.get("mask_ratio", DEFAULT_MASK_RATIO) != DEFAULT_MASK_RATIO:
        settings.append(f"mask ratio {result['mask_ratio']}")
    if str(result.get("data", "synthetic")).startswith("real"):
        settings.append("real data")
    return f"{result['model']} ({', '.join(settings)})" if settings else result["model"]


def _row_dtype(result: dict, row: dict) -> str:
    """The row's own precision where it has one: reference-style runs fp16 autocast with a GradScaler, as
    the reference code does, whatever the other rows' dtype."""
    return row.get("precision") or result["dtype"]


def step_table(results: list[dict]) -> list[str]:
    lines = ["| model | device | dtype | batch | implementation | img/s | step ms median (p10-p90) | peak GiB | "
             "MFU (spec) | MFU (meas. GEMM) | first step s | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        env = r["environment"]
        for row in sustained_step_result(r)["results"]:
            if "error" in row:
                lines.append(f"| {_model_with_settings(r)} | {env['device']} | {_row_dtype(r, row)} | {r['batch_size']} | {row['name']} | "
                             f"failed: {row['error'][:80]} | | | | | | {_commit(r)} |")
                continue
            lines.append(
                f"| {_model_with_settings(r)} | {env['device']} | {_row_dtype(r, row)} | {r['batch_size']} | {_step_row_name(r, row)} | "
                f"{row['images_per_s']:.0f} | {1e3 * row['median_s']:.1f} ({1e3 * row['p10_s']:.1f}-{1e3 * row['p90_s']:.1f}) | "
                f"{_gib(row.get('peak_memory_bytes'))} | {_pct(row.get('mfu_spec'))} | {_pct(row.get('mfu_measured_gemm'))} | "
                f"{_seconds(row.get('first_step_s'))} | {_commit(r)} |")
    speedups = [(_model_with_settings(r), r["environment"]["device"], k, v) for r in results
                for k, v in step_speedups(r).items()]
    if speedups:
        lines += ["", "| model | device | img/s ratio | speed-up |", "|---|---|---|---|"]
        lines += [f"| {m} | {d} | {k} | {v:.2f}x |" for m, d, k, v in speedups]
    return lines


def _how_run(result: dict) -> str:
    """eager, compiled (scope, mode), or CUDA graph: how a table2 or pretrain result ran its steps."""
    compiled = result.get("compile")
    if compiled:
        return f"compiled ({compiled.get('scope', '?')}, {compiled.get('mode', '?')})"
    return "CUDA graph" if result.get("cuda_graph") else "eager"


def table2_speedups(result: dict) -> list[float]:
    """Each row's sustained speed-up over its encoder's baseline (the first row of that encoder, with mask
    tokens), from the recorded step times, per row: the run's own figure was batch-size aware."""
    out, baseline = [], {}
    for row in result["rows"]:
        base = baseline.setdefault(row["encoder"], row)
        per_image = mean_step_s(row) / row["batch_size"]  # ViT-H's rows may fall back to a smaller batch
        out.append((mean_step_s(base) / base["batch_size"]) / per_image)
    return out


def table2_table(results: list[dict]) -> list[str]:
    lines = ["| encoder | decoder depth | mask tokens in encoder | run | batch | mean step ms | measured speed-up | "
             "paper (TPU) | FLOP-count limit | device |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row, speedup in zip(r["rows"], table2_speedups(r)):
            paper = f"{row['paper_speedup']:.1f}x" if row.get("paper_speedup") is not None else "-"
            lines.append(
                f"| {row['encoder']} | {row['decoder_depth']} | {'yes' if row['encoder_mask_tokens'] else 'no'} | "
                f"{_how_run(r)} | {row['batch_size']} | {1e3 * mean_step_s(row):.1f} | {speedup:.2f}x | {paper} | "
                f"{row['flop_limit_speedup']:.2f}x | {r['environment']['device']} |")
    return lines


def profile_table(results: list[dict]) -> list[str]:
    lines = ["| model | device | batch | step ms | encoder | decoder | loss | optimizer | kernel time: matmul | attention "
             "| other | GPU busy | train GFLOP/img w/o [M] | w/ [M] |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        flops = r["flops_per_image"]
        t = r.get("time")
        if t is None:
            timing = "| - | - | - | - | - | -"
        else:
            step = t["step_median_s"]
            timing = (f"| {r['batch_size']} | {1e3 * step:.1f} | {_pct(t['encoder_s'] / step)} | {_pct(t['decoder_s'] / step)} | "
                      f"{_pct(t['loss_s'] / step)} | {_pct(t['median_s']['optimizer'] / step)}")
        kinds = r.get("kernel_time", {}).get("by_kind")
        if kinds is None:  # profiles written before the kernel table
            kernel_shares = "- | - | - | -"
        else:
            rest = 1 - kinds["matmul"]["share"] - kinds["attention"]["share"]
            busy = r["kernel_time"].get("device_busy_fraction")
            kernel_shares = (f"{_pct(kinds['matmul']['share'])} | {_pct(kinds['attention']['share'])} | {_pct(rest)} | "
                             f"{'-' if busy is None else _pct(busy)}")
        lines.append(f"| {r['model']} | {r['environment']['device']} {timing} | {kernel_shares} | "
                     f"{flops['without_mask_tokens']['train_total'] / 1e9:.3g} | {flops['with_mask_tokens']['train_total'] / 1e9:.3g} |")
    return lines


def kernels_table(results: list[dict]) -> list[str]:
    lines = ["| kernel | shapes of | precision | Triton ms | eager ms | compiled ms | GB/s on bytes floor | of copy GB/s | "
             "vs eager | vs compiled | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(entry: dict, name: str) -> str:
        return f"{entry[name]['median_ms']:.3f}" if "median_ms" in entry.get(name, {}) else "failed"

    def ratio(value) -> str:
        return f"{value:.2f}x" if value is not None else "-"

    for r in results:
        for e in r["results"]:
            tri = e.get("triton", {})
            lines.append(
                f"| {e['kernel']} | {e['model']} | {e['precision']} | {ms(e, 'triton')} | {ms(e, 'eager')} | "
                f"{ms(e, 'compiled')} | {tri.get('gbps_on_floor', 0):.0f} | {_pct(tri.get('fraction_of_copy_bandwidth'))} | "
                f"{ratio(tri.get('speedup_vs_eager'))} | {ratio(tri.get('speedup_vs_compiled'))} | "
                f"{r['environment']['device']} |")
    return lines


def consumed_images_per_s(results: list[dict], device: str, model: str = "mae_vit_base_patch16") -> float | None:
    """The fastest training step of fastmae's engine (eager or compiled) for ``model`` on ``device``:
    the rate a data loader has to keep up with."""
    rates = [sustained_images_per_s(row, r["batch_size"]) for r in results if r["benchmark"] == "step" and r["model"] == model
             and r["environment"]["device"] == device
             for row in r["results"] if row["name"].startswith("fastmae") and "error" not in row]
    return max(rates, default=None)


def data_table(results: list[dict], all_results: list[dict]) -> list[str]:
    """Loader img/s; with full augmentation also as a multiple of what ViT-B MAE training consumes on the
    same GPU (issue target: >= 1.2x)."""
    lines = ["| loader | mode | hw decoder share | img/s | of ViT-B training img/s | batch | CPU threads | device | commit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        env = r["environment"]
        consumed = consumed_images_per_s(all_results, env["device"])
        for row in r["results"]:
            share = f"{row['hw_decoder_load']:.2f}" if row.get("hw_decoder_load") is not None else "-"
            fed = f"{row['img_per_s'] / consumed:.2f}x" if consumed and row["mode"] == "augment" else "-"
            lines.append(f"| {row['loader']} | {row['mode']} | {share} | {row['img_per_s']:.0f} | {fed} | "
                         f"{r['batch_size']} | {r['num_threads']} | {env['device']} | {_commit(r)} |")
    return lines


def kernel_shapes_table(results: list[dict]) -> list[str]:
    """``benchmarks/kernel_shapes_gpu.py``: each kernel's launch shape against the fastest one timed."""
    lines = ["| kernel | shapes of | launcher's shape ms | fastest shape ms | fastest shape | speed-up | shapes timed | device |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for entry in r["results"]:
            best, timed = entry.get("best"), sum("median_ms" in v for v in entry["variants"])
            fastest = (f"{best['median_ms']:.3f} | {best['label']} | {entry['best_speedup_vs_default']:.2f}x"
                       if best else "- | - | -")
            lines.append(f"| {entry['kernel']} | {entry['model']} | {entry['launcher_default']['median_ms']:.3f} | "
                         f"{fastest} | {timed} of {len(entry['variants'])} | {r['environment']['device']} |")
    return lines


def train_table(results: list[dict]) -> list[str]:
    """``fastmae pretrain`` runs' summary.json: speed and the share of time spent waiting for data after
    the first logging window (issue target: < 5%)."""
    lines = ["| model | loader | run | images per epoch | batch | dtype | steps timed | img/s | waiting for data | "
             "MFU (spec) | peak GiB | device | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        steady = r["after_first_window"]
        img_per_s = f"{steady['img_per_s']:.0f}" if steady["img_per_s"] is not None else "-"
        lines.append(f"| {r['model']} | {r['loader']} | {_how_run(r)} | {r['images_per_epoch']} | {r['batch_size']} | {r['dtype']} | "
                     f"{r['timed_steps']} | {img_per_s} | {_pct(steady['data_wait_fraction'])} | "
                     f"{_pct(r.get('mfu_after_first_window'))} | {r['peak_mem_gb']:.1f} | {r['environment']['device']} | "
                     f"{_commit(r)} |")
    return lines


def partial_notes(results: list[dict]) -> list[str]:
    """Runs stopped part-way (a time limit, a crash) keep what they measured; say what is missing."""
    notes = []
    for r in results:
        if r.get("complete", True):
            continue
        missing = r.get("pending")
        notes.append(f"`{r['_file']}` is partial: the run stopped before "
                     + (", ".join(missing) if missing else "it finished") + ".")
    return notes


def sustained_step_result(result: dict) -> dict:
    """A step result with its rows' img/s and MFU recomputed as sustained (``sustained_images_per_s``)."""
    rows = []
    for row in result["results"]:
        if "error" not in row:
            rate = sustained_images_per_s(row, result["batch_size"])
            to_sustained = rate / row["images_per_s"]  # MFU is proportional to img/s
            row = {**row, "images_per_s": rate, "mfu_spec": _scaled(row.get("mfu_spec"), to_sustained),
                   "mfu_measured_gemm": _scaled(row.get("mfu_measured_gemm"), to_sustained)}
        rows.append(row)
    return {**result, "results": rows}


def redraw_charts(results: list[dict], results_dir: Path) -> list[Path]:
    """The step and Table 2 charts beside their JSON, drawn again from the sustained figures."""
    from fastmae.bench.step import plot_step
    from fastmae.bench.table2 import plot_table2

    drawn = []
    for r in results:
        path = results_dir / Path(r["_file"]).with_suffix(".png")
        if r["benchmark"] == "step":
            drawn.append(plot_step(sustained_step_result(r), path))
        elif r["benchmark"] == "table2" and r["rows"]:
            rows = [{**row, "measured_speedup": speedup} for row, speedup in zip(r["rows"], table2_speedups(r))]
            drawn.append(plot_table2(rows, path, f"Table 2 on {r['environment']['device']}, {r['dtype']}"))
    return drawn


def markdown(results: list[dict], chart_prefix: str = "benchmarks/results") -> str:
    """The README section; charts are linked as ``chart_prefix/<name>.png`` (relative to the README)."""
    if not results:
        return "_No benchmark results yet: run `fastmae bench step`, `fastmae bench table2` or `fastmae profile` " \
               "with `--out_dir benchmarks/results` / `--json` on a GPU._\n"
    sections = []
    for kind, title, table in (("step", "Training step", step_table), ("table2", "Table 2: encoder without mask tokens", table2_table),
                               ("profile", "Where the step's time goes", profile_table),
                               ("kernels", "Fused kernels, forward + backward", kernels_table),
                               ("kernel_shapes", "Fused kernels' launch shapes", kernel_shapes_table),
                               ("data", "Data loaders", lambda chosen: data_table(chosen, results)),
                               ("train", "Training runs on JPEG files (after the first logging window)", train_table)):
        chosen = [r for r in results if r["benchmark"] == kind]
        if chosen:
            files = ", ".join(f"`{r['_file']}`" for r in chosen)
            charts = [f"![{r['_chart']}]({chart_prefix}/{r['_chart']})" for r in chosen if r.get("_chart")]
            sections.append("\n".join([f"#### {title}", "", *table(chosen), "", f"From {files}.",
                                       *partial_notes(chosen), *(["", *charts] if charts else [])]))
    return "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results_dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--include_cpu", action="store_true", help="also CPU results (smoke runs)")
    parser.add_argument("--redraw_charts", action="store_true",
                        help="redraw the step and Table 2 charts from the sustained figures the tables show")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        print(f"make_results_table: error: {args.results_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        charts = Path(os.path.relpath(args.results_dir.resolve(), README_DIR)).as_posix()
        results = load_results(args.results_dir, args.include_cpu)
        if args.redraw_charts:
            for path in redraw_charts(results, args.results_dir):
                print(f"redrew {path}", file=sys.stderr)
            results = load_results(args.results_dir, args.include_cpu)  # the charts now there
        print(markdown(results, chart_prefix=charts), end="")
    except ValueError as err:
        print(f"make_results_table: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
