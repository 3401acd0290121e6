"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)


def test_readme_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    start = lines.index("```bash")
    cmds = lines[start + 1 : lines.index("```", start)]
    assert len(cmds) == 2
    assert "kama reproduce --quick" in cmds[0] and "pytest" in cmds[1]
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert cmds[1] in ci  # CI runs the README's test command verbatim
