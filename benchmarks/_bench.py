"""Helpers shared by the benchmark scripts: the provenance lines and the BENCHMARKS.md section writer."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch

from kama.ops.machine import Machine, describe
from kama.records import git_commit


def machine() -> Machine:
    """The machine of this run (CPU model, caches, SIMD level)."""
    return describe()


def provenance_lines(command: str, threads: str | int) -> list[str]:
    """The command, machine (CPU model, caches, SIMD level), thread count, torch version, commit and date of a
    table."""
    return [f"Command: `{command}`  ",
            f"Machine: {machine().summary()}, {platform.machine()}; {threads} thread(s); torch {torch.__version__}; "
            f"commit `{git_commit()}`; {datetime.date.today().isoformat()}.  "]


def write_section(path: Path | None, name: str, lines: list[str], *, per_machine: bool = True) -> None:
    """Replace the section ``name`` of ``path`` (between its begin/end markers; appended if absent). With
    ``per_machine`` the section belongs to this kind of machine (one table per machine seen)."""
    if path is None:
        return
    if per_machine:
        name = f"{name}:{machine().slug()}"
        lines = [f"### {machine().summary()}", "", *lines]
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = "\n".join([begin, *lines, end])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        a, b = text.index(begin), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    print(f"wrote {path}")
