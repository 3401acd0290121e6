"""Optional dependencies: the operator and the layers need only torch and numpy; plotting, progress bars,
scikit-learn and the RL stack come with the extras that use them."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependencyError", "require"]


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``purpose`` and the extra to install.

    Example:
        >>> require("math", "reproduce", "arithmetic").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        package = {"sklearn": "scikit-learn"}.get(top, top)
        raise MissingDependencyError(f"{purpose} needs {package}, which is not installed: "
                                     f"pip install 'kama-nn[{extra}]'") from e
