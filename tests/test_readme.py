"""The README's and the user guide's Python examples run as written; the documentation builds without warnings;
the version has one source."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import kama

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = sorted((ROOT / "docs").glob("*.md"))


def _run_blocks(path: Path) -> int:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(path), "exec"), scope)
    return len(blocks)


def test_readme_python_blocks_run():
    assert _run_blocks(README) > 0


@pytest.mark.parametrize("page", GUIDE, ids=[p.name for p in GUIDE])
def test_guide_python_blocks_run(page):
    _run_blocks(page)


def test_readme_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    start = lines.index("```bash")
    cmds = lines[start + 1 : lines.index("```", start)]
    assert len(cmds) == 2
    assert "kama reproduce --quick" in cmds[0] and "pytest" in cmds[1]
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert cmds[1] in ci  # CI runs the README's test command verbatim


def test_one_version():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "kama.__version__"' in pyproject
    assert f"version: {kama.__version__}" in (ROOT / "CITATION.cff").read_text()
    assert re.match(r"^\d+\.\d+\.\d+$", kama.__version__)


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-q", "-W", "--keep-going", "-b", "html",
                           str(ROOT / "docs"), str(tmp_path / "html")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
