"""Files replaced whole or not at all: results and checkpoints survive a run killed while writing.
And the places they go, checked before a run starts, so a long run does not end in a traceback at its
first save."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """``write`` fills a temporary file beside ``path``, which is flushed to disk and renamed over
    ``path``: a kill at any point leaves the previous file whole (or no file), never part of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        # a plain OSError (a write that failed), named by the folder, not the temporary file's name;
        # ENOENT would make it a FileNotFoundError, which commands read as a missing input
        raise OSError(f"no file can be made in {path.parent}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            recorded = _OSErrorRecorder(f)
            try:
                write(recorded)
            except Exception as err:
                # torch.save's zip writer swallows the file's OSError (a full disk) and raises an opaque
                # RuntimeError ("unexpected pos ..."): the OSError is what callers can act on
                os_error = recorded.take_os_error()
                if os_error is not None and not isinstance(err, OSError):
                    raise os_error from err
                raise
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results and checkpoints are for others to read too
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


class _OSErrorRecorder:
    """A binary file that keeps the first OSError its writes or flushes raised."""

    def __init__(self, file: IO[bytes]):
        self._file = file
        self.os_error: OSError | None = None

    def take_os_error(self) -> OSError | None:
        """The kept OSError, no longer kept. Its traceback holds every frame that was running, the
        writer's caller's too; kept here, it would keep them all alive through the C++ writer
        (torch.save's) that holds this file, a cycle that no garbage collection sees."""
        os_error, self.os_error = self.os_error, None
        return os_error

    def write(self, data) -> int:
        return self._recorded(self._file.write, data)

    def flush(self) -> None:
        self._recorded(self._file.flush)

    def _recorded(self, operation, *args):
        try:
            return operation(*args)
        except OSError as err:
            self.os_error = self.os_error or err
            raise

    def __getattr__(self, name):  # tell, seek, fileno, ...: the file's own
        return getattr(self._file, name)


def set_aside(path: Path, tag: str) -> Path:
    """Rename ``path`` to the first free ``<stem>.<tag><suffix>``, ``<stem>.<tag>_2<suffix>``, ... beside
    it (an earlier run's file kept, never written over) -> the new path."""
    target, n = path.with_name(f"{path.stem}.{tag}{path.suffix}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.stem}.{tag}_{n}{path.suffix}")
    path.rename(target)
    return target


def refuse_to_replace(flag: str, path: str | os.PathLike, inputs: dict[str, str | os.PathLike] | None = None) -> None:
    """Raise ValueError when ``path`` exists (an empty folder excepted): a command that writes one
    result does not replace what is there, which may be the only copy of something, its own input
    among them (``inputs``: flag -> path, named in the message when ``path`` is one of them)."""
    path = Path(path)
    if path.is_dir() and not any(path.iterdir()):
        return
    if not (path.exists() or path.is_symlink()):
        return
    same = [name for name, given in (inputs or {}).items()
            if given and Path(given).exists() and os.path.samefile(given, path)]
    what = f" (it is the {same[0]} this command reads)" if same else ""
    raise ValueError(f"{flag} {path} already exists{what}; nothing is written over it: remove it first, or give "
                     f"another {flag}")


def check_destination(flag: str, path: str | os.PathLike, kind: str) -> None:
    """Raise ValueError naming ``flag`` when nothing can be written at ``path``; creates nothing.

    kind: "folder" (a folder that may not exist yet), "file" (a file, its folder may not exist yet)
    or "either" (a file or a folder, as the command's format decides).
    """
    if kind not in ("folder", "file", "either"):
        raise ValueError(f"kind must be 'folder', 'file' or 'either', got {kind!r}")
    path = Path(path)
    if kind == "folder" and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder")
    if kind == "file" and path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; name the file to write")
    # the nearest existing ancestor is where the missing folders would be made
    ancestor = path if kind == "folder" else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {path}: {ancestor} is a file, so no folder can be made there")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: no permission to write in {ancestor}")
