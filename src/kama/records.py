r"""Stored results that say what they were computed from: atomic files, provenance, content hashes, folder locks.

Used by ``kama reproduce`` (experiments), ``kama rl`` (runs and studies) and the benchmarks; nothing here
imports torch-heavy code, experiments or RL.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_text(folder / "a.txt", "hello\\n")
    >>> manifest = file_manifest(folder, ["a.txt"])
    >>> check_manifest(folder, manifest) is None
    True
    >>> with FolderLock(folder, "an example"):
    ...     (folder / LOCK_NAME).exists()
    True
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_text", "write_csv", "git_commit", "provenance", "content_hash", "file_digest",
           "file_manifest", "check_manifest", "FolderLock", "FolderBusyError", "LOCK_NAME", "StaleResultWarning"]

LOCK_NAME = ".kama.lock"
"""File name of the lock a writer holds in its output folder (JSON: pid, host, start time, command)."""


class StaleResultWarning(RuntimeWarning):
    """A stored result was not reused (corrupt, truncated, foreign or made with another config) and is recomputed."""


class FolderBusyError(RuntimeError):
    """Another live process holds the output folder's lock."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    return "" if v is None else str(v)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write a list of flat dicts as CSV (columns from the first row), atomically."""
    if not rows:
        atomic_write_text(path, "")
        return
    cols = list(rows[0])
    lines = [",".join(cols)]
    for r in rows:
        lines.append(",".join(_fmt(r.get(c)) for c in cols))
    atomic_write_text(path, "\n".join(lines) + "\n")


def git_commit(ignore: Sequence[str] = ()) -> str:
    """The git commit of the checkout this package's code runs from (an editable install), with ``+dirty`` if its
    tracked files differ from the commit; ``"unknown"`` for an installed copy. The working directory is never
    asked: a study run from one checkout with the code of another (a worktree of an older commit) must record the
    code's commit. ``ignore``: paths from the checkout's root whose changes do not count (a benchmark's own output
    file, written by the script's earlier tables)."""
    return _commit_of(Path(__file__).resolve().parent, ignore)


def _commit_of(where: Path, ignore: Sequence[str] = ()) -> str:
    """The commit of the git checkout holding ``where`` (``+dirty`` as in :func:`git_commit`), or ``"unknown"``."""
    spec = [":(top)", *(f":(top,exclude){path}" for path in ignore)]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *spec], cwd=where,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance() -> dict[str, Any]:
    """Package version, git commit, torch version, machine (with the CPU model, its caches and SIMD level: results
    are repeatable bit for bit only on the same code and core) and time, stored beside every result."""
    from . import __version__
    from .ops.machine import describe

    try:
        import torch

        torch_version = str(torch.__version__)
    except ImportError:  # pragma: no cover - torch is a dependency
        torch_version = "none"
    return {
        "kama_version": __version__,
        "git_commit": git_commit(),
        "torch": torch_version,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "cpu": describe().summary(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def content_hash(value: Any) -> str:
    """SHA-256 of the canonical JSON of ``value`` (sorted keys): the identity of a config or a stored value.

    Example:
        >>> content_hash({"a": 1, "b": [2, 3]}) == content_hash({"b": [2, 3], "a": 1})
        True
    """
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": digest}`` of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def file_manifest(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Digests of the files ``names`` (paths relative to ``folder``), to store beside a finished result."""
    folder = Path(folder)
    return {name: file_digest(folder / name) for name in sorted(names)}


def check_manifest(folder: Path, manifest: object) -> str | None:
    """``None`` if every file of ``manifest`` (from :func:`file_manifest`) is in ``folder`` with its size and
    digest, else why not (one line)."""
    if not isinstance(manifest, dict) or not manifest:
        return "it has no list of its output files"
    for name, want in manifest.items():
        path = Path(folder) / name
        if not isinstance(want, dict) or not path.is_file():
            return f"{name} is missing"
        try:
            got = file_digest(path)
        except OSError as e:
            return f"{name} cannot be read ({e})"
        if got != want:
            return f"{name} changed since it was written ({got['bytes']} bytes, {want.get('bytes')} recorded)"
    return None


def _alive(owner: dict[str, Any]) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process: cannot tell, so assume it is alive
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's live process
        return True
    return True


class FolderLock:
    """An exclusive writer's lock on an output folder: a :data:`LOCK_NAME` file holding the owner's pid and host.

    A second writer is refused with :class:`FolderBusyError` naming the owner; a lock left by a process that no
    longer runs (on this host) is taken over with a :class:`StaleResultWarning`. The lock file is created
    atomically with its contents (written to a temporary file, then hard-linked into place).

    Args:
        folder: the folder (created if missing).
        what: what is writing, for the messages (e.g. ``"kama reproduce"``).
    """

    def __init__(self, folder: str | Path, what: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._held = False

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".kama.lock.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self._held = True
                    return self
                except FileExistsError:
                    owner = self._owner()
                    if owner is not None and _alive(owner):
                        raise FolderBusyError(
                            f"{self.folder} is being written by {owner.get('what', 'another process')} (pid "
                            f"{owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}); wait for "
                            f"it, use another output folder, or delete {self.path} if that process is gone"
                        ) from None
                    warnings.warn(f"kama: taking over the lock {self.path} left by a process that no longer runs "
                                  f"({owner})", StaleResultWarning, stacklevel=3)
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
            raise FolderBusyError(f"could not take the lock {self.path} (other writers keep taking it)")
        finally:
            os.unlink(tmp)

    def _owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    def release(self) -> None:
        if self._held:
            self._held = False
            owner = self._owner()
            if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
