"""Optional dependencies: the core needs only torch and numpy; the extras' modules fail with an error that
names the extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kama._optional import MissingDependencyError, require

BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'matplotlib', 'tqdm', 'sklearn'}:
            raise ImportError(f'blocked: {name}')
sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=300)


def test_require_names_the_extra():
    assert require("math", "reproduce", "x").sqrt(9.0) == 3.0
    with pytest.raises(MissingDependencyError, match=r"plotting needs kama_no_such_module.*kama-nn\[reproduce\]"):
        require("kama_no_such_module", "reproduce", "plotting")
    with pytest.raises(MissingDependencyError, match="needs scikit-learn"):
        require("sklearn.kama_no_such_module", "sklearn", "y")
    assert issubclass(MissingDependencyError, ImportError)


def test_core_works_without_plotting_progress_or_sklearn():
    proc = _run("""
import torch, kama
layer = kama.KamaLinear(5, 3)
y = layer(torch.randn(4, 5)); y.sum().backward()
kama.givens_apply(torch.randn(2, 6), kama.random_pairs(6, 10), kama.random_angles(10))
import kama.features, kama.manifold
assert not any(m.split('.')[0] in {'matplotlib', 'tqdm', 'sklearn'} for m in sys.modules)
try:
    import kama.sklearn
except ImportError as e:
    print(type(e).__name__, e)
""")
    assert proc.returncode == 0, proc.stderr
    assert "MissingDependencyError" in proc.stdout and "kama-nn[sklearn]" in proc.stdout


def test_reproduce_without_matplotlib_names_the_extra(tmp_path):
    proc = _run(f"""
from kama.cli import main
raise SystemExit(main(['reproduce', '--quick', '--only', 'capacity', '--no-progress', '--out', {str(tmp_path)!r}]))
""")
    assert proc.returncode == 2, proc.stderr
    assert "kama: error:" in proc.stderr and "kama-nn[reproduce]" in proc.stderr
