"""What every result file says about where it was measured: device, versions, git commit, time."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from fastmae.atomic_file import atomic_write

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on CUDA (the paper-scale setting), fp32 on CPU (CPU half precision is slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"model name\s*:\s*(.+)", f.read())
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


GIT_COMMIT_VARIABLE = "FASTMAE_GIT_COMMIT"


def git_commit() -> dict:
    """HEAD of the checkout fastmae is imported from, and whether tracked files differ from it; or the
    commit named in $FASTMAE_GIT_COMMIT, for a copy of the working tree whose .git is not the one it was
    copied from (the GPU machine's: its results once recorded a commit 115 commits old)."""
    named = os.environ.get(GIT_COMMIT_VARIABLE)
    if named:
        return {"commit": named, "dirty": None, "source": GIT_COMMIT_VARIABLE}
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def environment_info(device: torch.device) -> dict:
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": _package_version("transformers"),
        "python": platform.python_version(),
        "host_cpu_threads": os.cpu_count(),
        "git": git_commit(),
        "utc_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def result_filename(what: str, device: torch.device) -> str:
    """``<what>_<gpu>_<date>.json``, the name of every committed result; the gpu part is 'cpu' on CPU."""
    if device.type == "cuda":
        gpu = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower().replace("nvidia", "")).strip("-")
    else:
        gpu = "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    return f"{what}_{gpu}_{date}.json"


def write_json(path: str | os.PathLike, result: dict) -> Path:
    """Replaces ``path`` whole: a run killed while writing (a time limit) leaves the previous version."""
    text = json.dumps(result, indent=2, default=str) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def settings_tag(device: torch.device, *, decoder_depth: int | None = None, mask_ratio: float = 0.75,
                 dtype: torch.dtype | None = None, real_data: bool = False) -> str:
    """A file-name part naming the settings other than the defaults (dtype: other than the device's
    ``auto``), so that runs of other settings on the same day are told apart by their names
    (``ResultFile`` keeps them apart in any case)."""
    return ((f"_dec{decoder_depth}" if decoder_depth is not None else "")
            + (f"_mask{mask_ratio:g}" if mask_ratio != 0.75 else "")
            + (f"_{dtype_name(dtype)}" if dtype is not None and dtype != resolve_dtype("auto", device) else "")
            + ("_realdata" if real_data else ""))


def numbered_paths(path: Path):
    """``path``, then ``<stem>_2<suffix>``, ``<stem>_3<suffix>``, ..."""
    yield path
    number = 2
    while True:
        yield path.with_name(f"{path.stem}_{number}{path.suffix}")
        number += 1


def write_new_json(path: str | os.PathLike, result: dict) -> Path:
    """Writes ``result`` to the first of ``numbered_paths(path)`` where neither the JSON nor its chart
    (.png) exists, and returns that path: an earlier run's result, or a concurrent run's, is never
    replaced. The name is taken with an exclusive create, so two runs cannot both take it; the result
    then replaces the empty file whole (``write_json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for candidate in numbered_paths(path):
        if candidate.with_suffix(".png").exists():
            continue
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            continue
        try:
            return write_json(candidate, result)
        except BaseException:
            candidate.unlink(missing_ok=True)  # the name taken for a result that was not written
            raise
    raise AssertionError("numbered_paths is endless")


class ResultFile:
    """Where a benchmark writes its result (JSON, rewritten as the run goes on) and its chart (the same
    stem, .png).

    A path given with ``--json`` is the user's choice and is rewritten; a name made up in ``--out_dir``
    is taken on the first write as ``write_new_json`` takes it, then rewritten by this run only."""

    def __init__(self, json_flag: str | None, out_dir: str | None, filename: str):
        if json_flag and Path(json_flag).suffix.lower() == ".png":
            # the chart goes beside the JSON with the suffix .png: it would take the JSON's place
            raise ValueError(f"--json {json_flag}: the JSON result cannot be a .png; the chart is written "
                             f"beside it as .png (e.g. --json {Path(json_flag).with_suffix('.json')})")
        self.requested = Path(json_flag) if json_flag else Path(out_dir) / filename if out_dir else None
        self.named_by_user = bool(json_flag)
        self.path: Path | None = None  # where the result is, once written
        self.written: dict | None = None  # the result last written: what a stopped run draws its chart of

    def __bool__(self) -> bool:
        return self.requested is not None

    def write(self, result: dict) -> Path:
        self.written = result
        if self.path is None and not self.named_by_user:
            self.path = write_new_json(self.requested, result)
        else:
            self.path = write_json(self.path or self.requested, result)
        return self.path

    @property
    def chart(self) -> Path:
        return (self.path or self.requested).with_suffix(".png")
