"""A disk that fills up while chosen files are written: after their first bytes the kernel refuses the
rest (ENOSPC), beneath whatever library is writing (torch.save, PIL, matplotlib). torch.save reports
such a partial write as its own RuntimeError."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class FillingUpFile:
    """A binary file that takes ``room`` bytes, then is full: the write that does not fit puts what fits
    on the disk and fails, as the kernel's does. A writer that asks for the descriptor, to write to it
    directly, finds it pointed at /dev/full."""

    def __init__(self, file, room: int):
        self._file, self._room = file, room

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        fits = data[:self._room]
        while fits:  # unbuffered: at the failure nothing is left in a buffer for close() to flush
            fits = fits[os.write(self._file.fileno(), fits):]
        if len(data) > self._room:
            self._room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return len(data)

    def fileno(self) -> int:
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, self._file.fileno())
        os.close(full)
        self._room = 0
        return self._file.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


def refuse_writes(monkeypatch, file_names, room: int = 10_000) -> None:
    """Atomic writes (``fastmae.atomic_file``) of a file named in ``file_names`` fail after about ``room``
    bytes, as on a disk that fills up; every other file is written as usual."""
    real_fdopen = os.fdopen
    file_names = set(file_names)

    def fdopen(fd, *args, **kwargs):
        file = real_fdopen(fd, *args, **kwargs)
        # atomic_write's temporary files are named ".<final name>.<random>.tmp"
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        return FillingUpFile(file, room) if any(name.startswith(f".{n}.") for n in file_names) else file

    monkeypatch.setattr(os, "fdopen", fdopen)
