"""Experiments of the paper, one module per figure or table, run by ``kama reproduce``.

The library (``kama.givens``, ``kama.nn``, ...) never imports this package.
"""

from .base import REGISTRY, Experiment, RunContext, register
from .runner import load_experiments, reproduce

__all__ = ["REGISTRY", "Experiment", "RunContext", "register", "reproduce", "load_experiments"]
