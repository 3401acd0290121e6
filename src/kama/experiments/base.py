"""Experiment plumbing: the registry, resumable units, provenance and atomic result files.

An experiment is a module-level :class:`Experiment` object with a config dataclass per mode (``quick`` and
``full``) and a ``run(config, ctx)`` function. ``run`` splits its work into *units* through
:meth:`RunContext.unit`: each unit's result is stored as JSON as soon as it is computed, so an interrupted
run resumes where it stopped, and a finished experiment is skipped when rerun with the same config.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._checks import check_bool, check_choice, check_int, check_real
from ..records import StaleResultWarning, atomic_write_text, content_hash, git_commit, provenance, write_csv

__all__ = ["Experiment", "RunContext", "REGISTRY", "register", "atomic_write_text", "provenance", "git_commit",
           "write_csv", "UNIT_FORMAT", "check_fields"]

UNIT_FORMAT = 1
"""Version of the stored unit envelope ``{"format", "unit", "config_hash", "sha256", "value"}``."""


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


@dataclass
class RunContext:
    """Where an experiment writes, and its resumable units.

    Every unit is stored as ``units/<key>.json`` holding the value, the unit's key, the hash of the config it
    was computed with and a digest of the value. A stored unit is reused only if all of them check out; a
    corrupt, truncated or foreign file, or one of another config, is recomputed with a
    :class:`~kama.records.StaleResultWarning`.

    Attributes:
        out_dir: the experiment's folder (``<out>/<name>``).
        config_hash: :func:`kama.records.content_hash` of the experiment's config.
        bar: a progress bar (``update``/``set_postfix_str``), one tick per unit.
        units_done: units loaded from disk instead of recomputed in this run.
    """

    out_dir: Path
    config_hash: str = ""
    bar: Any = field(default_factory=_NullBar)
    units_done: int = 0

    def _stored(self, path: Path, key: str) -> tuple[Any, str | None]:
        """``(value, None)`` for a valid stored unit, else ``(None, why not)``."""
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return None, f"it is not valid JSON ({e})"
        if not isinstance(data, dict) or not {"format", "unit", "config_hash", "sha256", "value"} <= set(data):
            return None, "it is not a stored unit"
        if data["format"] != UNIT_FORMAT or data["unit"] != key:
            return None, f"it is unit {data['unit']!r} of format {data['format']!r}"
        if data["config_hash"] != self.config_hash:
            return None, "it was computed with another config"
        if data["sha256"] != content_hash(data["value"]):
            return None, "its value does not match its digest"
        return data["value"], None

    def unit(self, key: str, fn: Callable[[], Any]) -> Any:
        """Return the JSON result of unit ``key``, computing and storing it only if no valid one is stored."""
        path = self.out_dir / "units" / f"{key}.json"
        self.bar.set_postfix_str(key)
        if path.exists():
            value, why = self._stored(path, key)
            if why is None:
                self.units_done += 1
                self.bar.update(1)
                return value
            warnings.warn(f"kama: recomputing {path}: {why}", StaleResultWarning, stacklevel=2)
        value = json.loads(json.dumps(fn()))  # stored and returned alike (tuples become lists)
        atomic_write_text(path, json.dumps({"format": UNIT_FORMAT, "unit": key, "config_hash": self.config_hash,
                                            "sha256": content_hash(value), "value": value}))
        self.bar.update(1)
        return value


@dataclass(frozen=True)
class Experiment:
    """A registered experiment of ``kama reproduce``.

    Attributes:
        name: identifier used by ``--only`` and as the output folder name.
        title: one line for the report.
        configs: ``{"quick": cfg, "full": cfg}``, frozen dataclass instances (documented fields).
        run: ``run(config, ctx)``; writes figures and CSVs under ``ctx.out_dir`` and returns a Markdown summary.
        num_units: ``num_units(config)``, the number of ``ctx.unit`` calls (for the progress bar).
        check: ``check(config)``, validation too costly for the config's ``__post_init__`` (e.g. creating an
            environment), run for every experiment before any of them starts.
    """

    name: str
    title: str
    configs: dict[str, Any]
    run: Callable[[Any, RunContext], str]
    num_units: Callable[[Any], int]
    check: Callable[[Any], None] | None = None

    def config(self, mode: str, overrides: dict[str, Any] | None = None) -> Any:
        cfg = self.configs[mode]
        if overrides:
            names = {f.name for f in dataclasses.fields(cfg)}
            unknown = sorted(set(overrides) - names)
            if unknown:
                raise ValueError(f"unknown config field(s) {unknown} for experiment {self.name!r}; known: "
                                 f"{sorted(names)}")
            overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
            for k, v in overrides.items():
                _check_override(f"{self.name}.{k}", getattr(cfg, k), v)
            try:  # the config's own checks (its __post_init__) name the field; say whose field it is
                cfg = dataclasses.replace(cfg, **overrides)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{self.name}.{e}") from None
        return cfg


def check_fields(cfg: Any, spec: dict[str, tuple]) -> None:
    """Validate a config dataclass's fields (type and range), raising ``TypeError`` / ``ValueError`` that name the
    field. ``spec`` maps a field to ``(kind, *bounds)``:

    * ``("int", minimum)``, ``("real", minimum, maximum, minimum_excluded)``, ``("bool",)``;
    * ``("ints", minimum)``, ``("reals", minimum, maximum, minimum_excluded)``: non-empty lists of them;
    * ``("names", choices)``: a non-empty list of distinct strings from ``choices``.
    """
    for name, (kind, *bounds) in spec.items():
        value = getattr(cfg, name)
        if kind == "int":
            check_int(name, value, minimum=bounds[0])
        elif kind == "real":
            check_real(name, value, minimum=bounds[0], maximum=bounds[1], strict_minimum=bounds[2])
        elif kind == "bool":
            check_bool(name, value)
        else:
            if not isinstance(value, tuple | list) or not value:
                raise ValueError(f"{name} must be a non-empty list, got {value!r}")
            for v in value:
                if kind == "ints":
                    check_int(f"{name} (each entry)", v, minimum=bounds[0])
                elif kind == "reals":
                    check_real(f"{name} (each entry)", v, minimum=bounds[0], maximum=bounds[1],
                               strict_minimum=bounds[2])
                elif kind == "names":
                    check_choice(f"{name} (each entry)", v, tuple(bounds[0]))
                else:  # pragma: no cover - a spec error in this package
                    raise AssertionError(f"unknown field kind {kind!r}")
            if kind == "names" and len(set(value)) != len(value):
                raise ValueError(f"{name} must not repeat an entry, got {list(value)!r}")


def _check_override(name: str, default: Any, value: Any) -> None:
    """An override must have the kind of value its field has (number, flag, text, list or mapping)."""
    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "true or false"), ((int, float), "a number"), (str, "a string"), (tuple, "a list"),
        (dict, "a mapping")]
    for kind, words in kinds:
        if isinstance(default, kind):
            ok = isinstance(value, kind) and not (kind == (int, float) and isinstance(value, bool))
            if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
                ok = False  # an int field takes an int (50, not 50.0)
                words = "an int"
            if not ok:
                raise ValueError(f"{name} must be {words} like its default {default!r}, got {value!r}")
            return


REGISTRY: dict[str, Experiment] = {}


def register(exp: Experiment) -> Experiment:
    """Add ``exp`` to the registry that ``kama reproduce`` runs (in registration order)."""
    if exp.name in REGISTRY:
        raise ValueError(f"experiment {exp.name!r} is already registered")
    REGISTRY[exp.name] = exp
    return exp
