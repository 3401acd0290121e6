"""Helpers shared by the benchmark scripts: the provenance lines and the BENCHMARKS.md section writer."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch

from kama.records import git_commit


def provenance_lines(command: str, threads: str | int) -> list[str]:
    """The command, machine, thread count, torch version, commit and date of a table."""
    return [f"Command: `{command}`  ",
            f"Machine: {platform.machine()} ({platform.processor() or 'cpu'}), {threads} thread(s), torch "
            f"{torch.__version__}; commit `{git_commit()}`; {datetime.date.today().isoformat()}.  "]


def write_section(path: Path | None, name: str, lines: list[str]) -> None:
    """Replace the section ``name`` of ``path`` (between its begin/end markers; appended if absent)."""
    if path is None:
        return
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
