"""One run at a time in an output folder.

A second launch into a folder where a run is still going (a job submitted twice, a relaunch while
the first is still saving) would truncate its metrics, interleave its checkpoints and rotate them
away. The earlier-run check (``checkpoints.earlier_run_outputs``) sees only what a run has written
so far; this lock covers the rest. It is an advisory POSIX record lock (``lockf``) on
``.fastmae-run.lock``, which the system releases when the holding process ends however it ends, so
no stale lock outlives a killed run. Not ``flock``: a forked child (a DataLoader worker) shares a
``flock`` and kept the folder locked for seconds after its run was killed, where a record lock
belongs to the one process. Where the file system has no locks (some network file systems) runs go
unlocked.
"""

from __future__ import annotations

import datetime
import os
import socket
import weakref
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system: no flock, runs go unlocked
    fcntl = None

LOCK_NAME = ".fastmae-run.lock"


class OutputFolderInUse(ValueError):
    pass


def _holder_said(file) -> str:
    """The line the holding process wrote in the lock file."""
    file.seek(0)
    return file.read().strip() or "a process that has not said which yet"


def in_use_message(output_dir: str | Path, holder: str) -> str:
    return (f"--output_dir {output_dir} is in use by another fastmae run ({holder}); wait for it to end, or give "
            "another --output_dir")


class OutputFolderLock:
    """Held from ``acquire`` until ``release`` (or the process's end, or until the object is collected).

    A record lock belongs to the process, not to a file descriptor: a second lock from the same process
    would succeed, and closing any descriptor of the file drops it. So the process keeps the folders it
    holds in ``_held`` (the locks themselves, weakly: a lock collected has closed its file) and refuses a
    second run into one of them without touching the file."""

    _held: "weakref.WeakValueDictionary[str, OutputFolderLock]" = weakref.WeakValueDictionary()

    def __init__(self, file, folder: str):
        self._file = file
        self._folder = folder
        OutputFolderLock._held[folder] = self

    @classmethod
    def acquire(cls, output_dir: str | Path) -> "OutputFolderLock":
        """Lock ``output_dir`` (made if missing) for this process; raise OutputFolderInUse naming the
        holder when another process, or another run of this one, holds it; OSError when nothing can be
        written there."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        folder = os.path.realpath(output_dir)
        if folder in cls._held:
            raise OutputFolderInUse(in_use_message(output_dir, cls._this_process()))
        file = open(output_dir / LOCK_NAME, "a+", encoding="utf-8")
        if fcntl is None:
            return cls(file, folder)
        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
            holder = _holder_said(file)
            file.close()
            raise OutputFolderInUse(in_use_message(output_dir, holder)) from None
        except OSError:  # no locks on this file system
            return cls(file, folder)
        started = datetime.datetime.now().isoformat(timespec="seconds")
        try:
            file.seek(0)
            file.truncate()
            file.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
            file.flush()
        except OSError:  # a full disk: the caller says so; the lock goes with the file
            file.close()
            raise
        return cls(file, folder)

    @classmethod
    def holder(cls, output_dir: str | Path) -> str | None:
        """Who holds ``output_dir``'s lock (as it wrote it; this process, if it does), else None; creates
        nothing. For a refusal that would otherwise blame a live run's files on an earlier run."""
        if os.path.realpath(output_dir) in cls._held:
            return cls._this_process()  # not probed: closing the probe's descriptor would drop our lock
        path = Path(output_dir) / LOCK_NAME
        if fcntl is None or not path.is_file():
            return None
        try:
            with open(path, encoding="utf-8") as file:  # read access is enough for a shared probe
                try:
                    fcntl.lockf(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except (BlockingIOError, PermissionError):
                    return _holder_said(file)
                return None  # closing the file releases the probe's lock
        except OSError:  # unreadable, or no locks on this file system
            return None

    @staticmethod
    def _this_process() -> str:
        return f"this process, pid {os.getpid()}: a run started from the same Python process"

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # releases the lock
            self._file = None
            OutputFolderLock._held.pop(self._folder, None)
