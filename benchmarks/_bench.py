"""Helpers shared by the benchmark scripts: the provenance lines and the BENCHMARKS.md section writer."""

from __future__ import annotations

import datetime
import platform
import re
from pathlib import Path

import torch

import kama
from kama.ops.machine import Machine, describe
from kama.records import git_commit

# What the benchmarks write: a change there (an earlier table of `run_cpu.sh`) does not make the code's commit dirty
OUTPUTS = ("BENCHMARKS.md", "benchmarks/plots")


def machine() -> Machine:
    """The machine of this run (CPU model, caches, SIMD level)."""
    return describe()


def make_plan(family: str, d: int, k: int, g: torch.Generator) -> kama.GivensPlan:
    """The paper's Kac walk (``kac``) or a register-blocked plan (``blocked``) of ``k`` rotations."""
    pairs = kama.random_pairs(d, k, generator=g) if family == "kac" else kama.ops.blocked_pairs(d, k, generator=g)
    return kama.GivensPlan(pairs, d)


def provenance_lines(command: str, threads: str | int) -> list[str]:
    """The command, machine (CPU model, caches, SIMD level), thread count, torch version, commit and date of a
    table."""
    return [f"Command: `{command}`  ",
            f"Machine: {machine().summary()}, {platform.machine()}; {threads} thread(s); torch {torch.__version__}; "
            f"commit `{git_commit(ignore=OUTPUTS)}`; {datetime.date.today().isoformat()}.  "]


def write_section(path: Path | None, name: str, lines: list[str], *, per_machine: bool = True,
                  device: str | None = None) -> None:
    """Replace the section ``name`` of ``path`` (between its begin/end markers). With ``per_machine`` the section
    belongs to this kind of machine (one table per machine seen): a new machine's goes after the other machines'
    tables of the same benchmark. Otherwise a new section is appended. ``device`` names the machine instead of the
    host CPU (a GPU's name)."""
    if path is None:
        return
    bench = name
    if per_machine:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-") if device else machine().slug()
        name = f"{name}:{slug}"
        lines = [f"### {device or machine().summary()}", "", *lines]
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = "\n".join([begin, *lines, end])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        a, b = text.index(begin), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    elif per_machine and (others := list(re.finditer(rf"<!-- {re.escape(bench)}:[^ ]+:end -->", text))):
        # another machine's table of this benchmark: this machine's goes right after it
        b = others[-1].end()
        text = text[:b] + "\n\n" + block + text[b:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    print(f"wrote {path}")
