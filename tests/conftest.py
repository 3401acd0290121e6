"""Shared fixtures and the dense oracle: explicit products of n x n Givens matrices."""

from __future__ import annotations

import math
import os

import pytest
import torch

# The CPU kernel's settings: the built-in ones (no calibration, no file in the user's cache), so that tile widths
# are the same on every machine the tests run on; tests/test_tuning.py exercises the calibration itself.
os.environ.setdefault("KAMA_TUNING", "defaults")

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's CPU interpreter (read when kama's kernels are first
    # JIT-decorated, so it must be set before that): tests/test_triton.py then checks them on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (minutes each; .ci/run passes this)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (as .ci/run does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


def oracle_matrix(pairs: torch.Tensor, angles: torch.Tensor, d: int) -> torch.Tensor:
    """M = G_1 G_2 ... G_k by explicit dense products (slow, obviously right)."""
    m = torch.eye(d, dtype=angles.dtype, device=angles.device)
    eye = torch.eye(d, dtype=angles.dtype, device=angles.device)
    for (i, j), t in zip(pairs.tolist(), angles.unbind(0) if angles.numel() else [], strict=False):
        g = eye.clone()
        c, s = torch.cos(t), torch.sin(t)
        g = g.index_put((torch.tensor([i, j, j, i]), torch.tensor([i, j, i, j])), torch.stack([c, c, s, -s]))
        m = m @ g
    return m


def tol(dtype: torch.dtype, k: int = 0, d: int = 1) -> float:
    """Tolerance derived from the dtype: rounding grows like sqrt(number of operations)."""
    eps = torch.finfo(dtype).eps
    return 20.0 * math.sqrt(k + d + 1) * eps


def set_tuning(monkeypatch: pytest.MonkeyPatch, **changes: object) -> None:
    """Run the CPU kernel with some settings changed from the built-in ones (restored after the test)."""
    from dataclasses import replace

    from kama.ops import cpu, tuning

    monkeypatch.setattr(tuning, "_CURRENT", replace(tuning.DEFAULTS, **changes))
    monkeypatch.setattr(cpu, "_TILE_WIDTHS", {})
