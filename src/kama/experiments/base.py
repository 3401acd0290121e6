"""Experiment plumbing: the registry, resumable units, provenance and atomic result files.

An experiment is a module-level :class:`Experiment` object with a config dataclass per mode (``quick`` and
``full``) and a ``run(config, ctx)`` function. ``run`` splits its work into *units* through
:meth:`RunContext.unit`: each unit's result is stored as JSON as soon as it is computed, so an interrupted
run resumes where it stopped, and a finished experiment is skipped when rerun with the same config.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Experiment", "RunContext", "REGISTRY", "register", "atomic_write_text", "provenance", "git_commit"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never a half-written file)."""
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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    return "" if v is None else str(v)


def git_commit() -> str:
    """The git commit of the working directory's repository, or of the package's, with ``+dirty`` if so."""
    for cwd in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                  timeout=10)
            if head.returncode != 0:
                continue
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                   capture_output=True, text=True, timeout=10)
            return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown"


def provenance() -> dict[str, Any]:
    """Package version, git commit, torch version, machine and time, stored beside every result."""
    from .. import __version__

    return {
        "kama_version": __version__,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


@dataclass
class RunContext:
    """Where an experiment writes, and its resumable units.

    Attributes:
        out_dir: the experiment's folder (``<out>/<name>``).
        bar: a progress bar (``update``/``set_postfix_str``), one tick per unit.
        units_done: units loaded from disk instead of recomputed in this run.
    """

    out_dir: Path
    bar: Any = field(default_factory=_NullBar)
    units_done: int = 0

    def unit(self, key: str, fn: Callable[[], Any]) -> Any:
        """Return the JSON result of unit ``key``, computing and storing it only if not stored yet."""
        path = self.out_dir / "units" / f"{key}.json"
        self.bar.set_postfix_str(key)
        if path.exists():
            try:
                value = json.loads(path.read_text())
                self.units_done += 1
                self.bar.update(1)
                return value
            except json.JSONDecodeError:
                path.unlink()
        value = fn()
        atomic_write_text(path, json.dumps(value))
        self.bar.update(1)
        return value


@dataclass(frozen=True)
class Experiment:
    """A registered experiment of ``kama reproduce``.

    Attributes:
        name: identifier used by ``--only`` and as the output folder name.
        title: one line for the report.
        configs: ``{"quick": cfg, "full": cfg}``, frozen dataclass instances (documented fields).
        run: ``run(config, ctx)``; writes figures and CSVs under ``ctx.out_dir`` and returns a Markdown summary.
        num_units: ``num_units(config)``, the number of ``ctx.unit`` calls (for the progress bar).
    """

    name: str
    title: str
    configs: dict[str, Any]
    run: Callable[[Any, RunContext], str]
    num_units: Callable[[Any], int]

    def config(self, mode: str, overrides: dict[str, Any] | None = None) -> Any:
        cfg = self.configs[mode]
        if overrides:
            names = {f.name for f in dataclasses.fields(cfg)}
            unknown = sorted(set(overrides) - names)
            if unknown:
                raise ValueError(f"unknown config field(s) {unknown} for experiment {self.name!r}; known: "
                                 f"{sorted(names)}")
            overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
            for k, v in overrides.items():
                _check_override(f"{self.name}.{k}", getattr(cfg, k), v)
            cfg = dataclasses.replace(cfg, **overrides)
        return cfg


def _check_override(name: str, default: Any, value: Any) -> None:
    """An override must have the kind of value its field has (number, flag, text, list or mapping)."""
    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "true or false"), ((int, float), "a number"), (str, "a string"), (tuple, "a list"),
        (dict, "a mapping")]
    for kind, words in kinds:
        if isinstance(default, kind):
            ok = isinstance(value, kind) and not (kind == (int, float) and isinstance(value, bool))
            if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
                ok = value.is_integer()
            if not ok:
                raise ValueError(f"{name} must be {words} like its default {default!r}, got {value!r}")
            return


REGISTRY: dict[str, Experiment] = {}


def register(exp: Experiment) -> Experiment:
    """Add ``exp`` to the registry that ``kama reproduce`` runs (in registration order)."""
    if exp.name in REGISTRY:
        raise ValueError(f"experiment {exp.name!r} is already registered")
    REGISTRY[exp.name] = exp
    return exp
