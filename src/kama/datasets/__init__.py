"""The six datasets of the paper's kernel experiments (and two alternatives), shipped inside the package.

Raw values, one CSV per dataset, features first and the original response in the last column ``target``.
Sources, licences and conversion notes: ``README.md`` in this folder (also :func:`provenance`). Nothing is
downloaded.

Example:
    >>> X, y = load("boston")
    >>> X.shape, y.shape
    ((506, 13), (506,))
"""

from __future__ import annotations

import csv
from functools import cache
from importlib import resources

import numpy as np

__all__ = ["NAMES", "ALTERNATIVES", "load", "feature_names", "provenance", "prepare"]

NAMES: tuple[str, ...] = ("g50c", "boston", "cpu", "insurance", "wine", "parkinson")
"""The paper's datasets (Figure 2), in its order."""
ALTERNATIVES: tuple[str, ...] = ("wine_uci178", "parkinsons_oxford195")
"""Other variants of two ambiguous datasets (see README.md)."""


@cache
def _read(name: str) -> tuple[tuple[str, ...], np.ndarray]:
    if name not in NAMES + ALTERNATIVES:
        raise ValueError(f"name must be one of {list(NAMES + ALTERNATIVES)}, got {name!r}")
    with resources.files(__name__).joinpath(f"{name}.csv").open() as f:
        rows = list(csv.reader(f))
    header = tuple(rows[0])
    data = np.asarray(rows[1:], dtype=np.float64)
    data.setflags(write=False)
    return header, data


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` of a packaged dataset as float64 arrays (copies), raw values.

    Args:
        name: one of :data:`NAMES` or :data:`ALTERNATIVES`.
    """
    _, data = _read(name)
    return data[:, :-1].copy(), data[:, -1].copy()


def feature_names(name: str) -> list[str]:
    """Column names of ``X`` for a packaged dataset."""
    return list(_read(name)[0][:-1])


def provenance() -> str:
    """The provenance and licence notes of the packaged datasets (``README.md``)."""
    return resources.files(__name__).joinpath("README.md").read_text()


def prepare(X: np.ndarray, *, standardize: bool = True) -> np.ndarray:
    """The angular-kernel protocol: z-score the columns (optional; constant columns are left at 0), then scale
    every row to unit norm (zero rows stay zero)."""
    X = np.asarray(X, dtype=np.float64)
    if standardize:
        sd = X.std(axis=0)
        X = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)
