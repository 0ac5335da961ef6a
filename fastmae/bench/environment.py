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
    """``<what>_<gpu>_<date>.json`` (DESIGN.md section 5); the gpu part is 'cpu' on CPU."""
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
