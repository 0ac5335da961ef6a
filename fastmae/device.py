"""The ``--device`` flag of every command: which device a run uses, or a message naming what is wrong
with the value (torch.device's own errors list every backend torch knows, most of which fastmae
does not run on)."""

from __future__ import annotations

import torch


def device_from_flag(value: str | None, flag: str = "--device") -> torch.device:
    """None or "auto": cuda when available, else cpu; otherwise "cpu", "cuda" or "cuda:N"."""
    if value is None or value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(f"{flag} {value}: not a device; give cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag} {value}: fastmae runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {value} was asked for but torch sees no CUDA device")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{flag} {value}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device
