"""Output folders: every command that writes a folder claims it first, atomically.

Two runs never share an output folder. A run owns its folder through a claim file,
``.mtl-opt-claim``, created with ``O_CREAT | O_EXCL`` (the file system lets exactly one
process create it) in a folder that is new or empty, and locked (``flock``) for as long as
the run holds the folder:

* ``--out`` missing: the folder is created (with its parents) and claimed;
* ``--out`` an empty folder: claimed;
* ``--out`` a folder with anything in it, a file, or a folder that cannot be written: refused
  with one message naming the folder, before any work;
* two runs racing for one folder: exactly one creates the claim file; the other is refused;
* a default, timestamped name (``runs/sweep-20260101-120000``) taken by a run started in the
  same second: the next free ``-2``, ``-3``, ... suffix is claimed instead.

A resumed run (``mtl-opt sweep --resume DIR``, ``mtl-opt rrg train --resume RUN``) re-claims its
own folder with :func:`reclaim_output_folder`: it takes the claim file's lock without waiting, so
a second resume of the same folder, or a resume while the original run is still alive, is refused
(the lock goes with its process, so a killed run does not leave its folder locked).

The claim file holds a line of JSON (command, process id, host, UTC start) that the refusal
message quotes.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

__all__ = [
    "CLAIM_FILE",
    "OutputFolder",
    "OutputFolderError",
    "claim_output_folder",
    "default_folder_name",
    "exclusive_file",
    "reclaim_output_folder",
]

#: The claim file's name inside a claimed folder.
CLAIM_FILE = ".mtl-opt-claim"

#: Suffixes tried for a default name before giving up (``-2`` .. ``-1000``).
_MAX_SUFFIX = 1000

try:  # POSIX; elsewhere the claim file alone guards a fresh claim
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None  # type: ignore[assignment]


class OutputFolderError(ValueError):
    """An output folder that cannot be claimed (taken, not empty, a file, not writable)."""


class OutputFolder:
    """A claimed output folder: ``path``, and the claim file's lock while the run holds it."""

    def __init__(self, path: Path, fd: int | None, created: bool) -> None:
        self.path = path
        self.created = created  # this claim created the folder itself
        self._fd = fd

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"OutputFolder({str(self.path)!r})"

    def release(self) -> None:
        """Give up the lock (the claim file stays: the folder belongs to this run's outputs)."""
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def abandon(self) -> None:
        """Undo a claim whose run wrote nothing: remove the claim file, and the folder if this
        claim created it and it is empty now. A folder with outputs in it is left as it is."""
        try:
            others = [e for e in os.listdir(self.path) if e != CLAIM_FILE]
            if not others and self._fd is not None:
                os.unlink(self.path / CLAIM_FILE)
                if self.created:
                    os.rmdir(self.path)
        except OSError:
            pass
        finally:
            self.release()

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abandon()
        else:
            self.release()


def default_folder_name(prefix: str) -> Path:
    """``runs/<prefix>-<UTC YYYYmmdd-HHMMSS>``: a command's default output folder (claim it
    with ``unique=True`` so that two runs started in the same second get two folders)."""
    return Path("runs") / time.strftime(f"{prefix}-%Y%m%d-%H%M%S", time.gmtime())


def _owner(path: Path) -> str:
    try:
        info = json.loads((path / CLAIM_FILE).read_text(encoding="utf-8"))
        return f" (claimed by `{info.get('command')}`, process {info.get('pid')} on {info.get('host')}, at {info.get('started')})"
    except (OSError, ValueError, AttributeError):
        return ""


def _in_use(path: Path) -> bool:
    """Whether a live process holds the claim file's lock."""
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fd = os.open(path / CLAIM_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _taken(path: Path) -> str:
    if _in_use(path):
        return f"output folder {path} is in use by another run{_owner(path)}; choose another --out"
    return f"output folder {path} holds another run's outputs{_owner(path)}; choose another --out"


def _lock(fd: int, path: Path, *, wait: bool) -> None:
    """Lock the claim file. A fresh claim waits (only another claimer's momentary probe in
    :func:`_in_use` can hold a file this process has just created); a resume tries a few
    times over a fraction of a second and then refuses (a live run holds the lock)."""
    if fcntl is None:  # pragma: no cover
        return
    if wait:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    for attempt in range(10):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.05)
    os.close(fd)
    raise OutputFolderError(
        f"output folder {path} is in use by another run{_owner(path)}; wait for it to end"
    )


def _claim_once(path: Path, command: str) -> OutputFolder:
    """Claim ``path`` or raise :class:`OutputFolderError` (:class:`FileExistsError` when only
    the name is taken, so that a default name can move on to the next suffix)."""
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"output folder {path} is a file, not a folder; choose another --out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputFolderError(f"cannot create output folder {path}: a parent of it is a file") from None
    except NotADirectoryError:
        raise OutputFolderError(f"cannot create output folder {path}: a parent of it is a file") from None
    except PermissionError:
        raise OutputFolderError(f"cannot create output folder {path}: permission denied") from None
    created = False
    try:
        os.mkdir(path)
        created = True
    except FileExistsError:
        if not path.is_dir():
            raise OutputFolderError(f"output folder {path} is a file, not a folder; choose another --out") from None
    except PermissionError:
        raise OutputFolderError(f"cannot create output folder {path}: permission denied") from None
    except OSError as exc:
        raise OutputFolderError(f"cannot create output folder {path}: {exc.strerror or exc}") from None
    if not created:
        entries = os.listdir(path)
        if CLAIM_FILE in entries:
            raise FileExistsError(_taken(path))
        if entries:
            raise FileExistsError(f"output folder {path} exists and is not empty; choose another --out")
    try:
        fd = os.open(path / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise FileExistsError(_taken(path)) from None
    except PermissionError:
        raise OutputFolderError(f"output folder {path} is not writable; choose another --out") from None
    except OSError as exc:
        raise OutputFolderError(f"cannot write in output folder {path}: {exc.strerror or exc}") from None
    _lock(fd, path, wait=True)
    record = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.write(fd, (json.dumps(record) + "\n").encode())
    return OutputFolder(path, fd, created)


def claim_output_folder(out: str | os.PathLike, *, command: str, unique: bool = False) -> OutputFolder:
    """Claim ``out`` for one run (see the module docstring), before the run does any work.

    ``unique=True`` (a command's default, timestamped name): when ``out`` is taken, claim
    ``out-2``, ``out-3``, ... instead. Raises :class:`OutputFolderError` (a ``ValueError``)
    naming the folder when it cannot be claimed.
    """
    path = Path(out).expanduser()
    try:
        return _claim_once(path, command)
    except FileExistsError as exc:
        if not unique:
            raise OutputFolderError(str(exc)) from None
    for n in range(2, _MAX_SUFFIX + 1):
        try:
            return _claim_once(path.with_name(f"{path.name}-{n}"), command)
        except FileExistsError:
            continue
    raise OutputFolderError(f"no free output folder {path}-N for N up to {_MAX_SUFFIX}; give --out")


def reclaim_output_folder(out: str | os.PathLike, *, command: str) -> OutputFolder:
    """Take back the folder of a run being resumed: it must exist, and no live process may
    hold it (the lock is taken without waiting)."""
    path = Path(out).expanduser()
    if not path.is_dir():
        raise OutputFolderError(f"no run to resume in {path}: it is not a folder")
    try:
        fd = os.open(path / CLAIM_FILE, os.O_CREAT | os.O_WRONLY, 0o644)
    except OSError as exc:
        raise OutputFolderError(f"cannot resume in {path}: {exc.strerror or exc}") from None
    _lock(fd, path, wait=False)
    record = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "resumed": True}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(record) + "\n").encode())
    return OutputFolder(path, fd, created=False)


def exclusive_file(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a new file ``path`` (its folder is created); an existing file is never
    overwritten: :class:`OutputFolderError` names it."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise OutputFolderError(f"{path} exists; choose another --out") from None
    except (NotADirectoryError, PermissionError, IsADirectoryError, OSError) as exc:
        raise OutputFolderError(f"cannot write {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path
