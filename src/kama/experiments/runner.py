"""``kama reproduce``: run every registered experiment, resumably, and write ``report.md``."""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any

from .._optional import require
from ..records import FolderLock, StaleResultWarning, check_manifest, content_hash, file_manifest
from .base import REGISTRY, RunContext, atomic_write_text, provenance

__all__ = ["reproduce", "load_experiments"]


def load_experiments() -> dict[str, Any]:
    """Import the experiment modules (each registers itself) and return the registry."""
    from . import capacity, digits, kernel_approx, rotations  # noqa: F401

    try:  # the RL experiment needs the rl extra (stable-baselines3, sb3-contrib, gymnasium[mujoco])
        from . import evolution, rl_policies  # noqa: F401
    except ImportError:  # pragma: no cover - without the rl extra
        pass

    return REGISTRY


def _config_json(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _read_json(path: Path) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, why)`` when ``path`` is not valid JSON."""
    try:
        return json.loads(path.read_text()), None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"{path.name} is not valid JSON ({e})"


def _finished_record(exp_dir: Path, config_hash: str) -> tuple[dict[str, Any] | None, str | None]:
    """The ``done.json`` record of a finished experiment whose outputs are intact, or ``(None, why not)``; ``why``
    is ``None`` when there is simply nothing finished (or a finished run of another config: not a defect)."""
    done = exp_dir / "done.json"
    if not done.exists():
        return None, None
    record, why = _read_json(done)
    if why is not None:
        return None, why
    if not isinstance(record, dict) or "config_hash" not in record:
        return None, "done.json is not a record of a finished experiment"
    if record["config_hash"] != config_hash:
        return None, None  # finished with another config: rerun with this one
    bad = check_manifest(exp_dir, record.get("outputs"))
    if bad is None and "summary.md" not in record["outputs"]:
        bad = "summary.md is missing"
    return (record, None) if bad is None else (None, bad)


def _outputs(exp_dir: Path) -> list[str]:
    """Files an experiment wrote, relative to its folder: everything but its units, records and hidden files."""
    names = []
    for path in sorted(exp_dir.rglob("*")):
        rel = path.relative_to(exp_dir)
        if path.is_file() and rel.parts[0] not in ("units", "done.json", "config.json") \
                and not any(part.startswith(".") for part in rel.parts):
            names.append(rel.as_posix())
    return names


def _prepare(exp_dir: Path, config_hash: str, cfg_json: dict[str, Any], force: bool, finished: bool = False) -> None:
    """Write ``config.json``; drop the stored units when the config changed (or ``force``). For a ``finished``
    experiment only a damaged ``config.json`` is rewritten."""
    cfg_path = exp_dir / "config.json"
    drop = force
    if finished and cfg_path.exists() and _read_json(cfg_path)[0] == {"config": cfg_json, "config_hash": config_hash}:
        return
    if cfg_path.exists():
        old, why = _read_json(cfg_path)
        if why is None and not isinstance(old, dict):
            why = "config.json is not a config record"
        if why is not None:  # the stored units are then validated one by one
            warnings.warn(f"kama: replacing {cfg_path}: {why}", StaleResultWarning, stacklevel=3)
        elif old.get("config_hash") != config_hash and not finished:
            drop = True  # units of another config are not reusable
    if drop:
        for p in (exp_dir / "units").glob("*.json"):
            p.unlink()
    atomic_write_text(cfg_path, json.dumps({"config": cfg_json, "config_hash": config_hash}, indent=2))


def reproduce(
    mode: str = "quick",
    only: list[str] | None = None,
    out: str | Path = "results",
    overrides: dict[str, dict[str, Any]] | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Run the registered experiments and write figures, CSVs and ``report.md`` under ``out``.

    A finished experiment (its ``done.json`` holds the same config) is skipped; an interrupted one resumes
    from its stored units. ``force=True`` recomputes everything.

    Args:
        mode: ``"quick"`` or ``"full"``.
        only: names of experiments to run (default: all).
        out: output folder.
        overrides: ``{experiment: {field: value}}`` replacing config fields.
        force: ignore finished results and stored units.
        progress: show a progress bar.

    Returns:
        The path of ``report.md``.
    """
    if mode not in ("quick", "full"):
        raise ValueError(f"mode must be 'quick' or 'full', got {mode!r}")
    registry = load_experiments()
    names = list(registry) if not only else list(only)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; known: {list(registry)}")
    overrides = overrides or {}
    bad = sorted(set(overrides) - set(names))
    if bad:
        raise ValueError(f"overrides name experiment(s) {bad} that are not being run ({names})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = {n: registry[n].config(mode, overrides.get(n)) for n in names}
    for n in names:  # every config is checked before any experiment starts
        if registry[n].check is not None:
            try:
                registry[n].check(cfgs[n])
            except (TypeError, ValueError) as e:
                raise type(e)(f"{n}.{e}") from None
    with FolderLock(out, "kama reproduce"):
        return _run_all(registry, names, cfgs, mode, out, force, progress)


def _run_all(registry: dict[str, Any], names: list[str], cfgs: dict[str, Any], mode: str, out: Path, force: bool,
             progress: bool) -> Path:
    total = sum(registry[n].num_units(cfgs[n]) for n in names)
    bar = require("tqdm.auto", "reproduce", "kama reproduce's progress bar").tqdm(
        total=total, desc=f"kama reproduce --{mode}", unit="unit", disable=not progress)
    prov = provenance()
    sections = []
    for name in names:
        exp = registry[name]
        cfg = cfgs[name]
        exp_dir = out / name
        cfg_json = _config_json(cfg)
        config_hash = content_hash({"experiment": name, "config": cfg_json})
        record, why = (None, None) if force else _finished_record(exp_dir, config_hash)
        if why is not None:
            warnings.warn(f"kama: rerunning {name} in {exp_dir}: {why}", StaleResultWarning, stacklevel=2)
        if record is not None:
            _prepare(exp_dir, config_hash, cfg_json, force=False, finished=True)
            bar.update(exp.num_units(cfg))
            status = "reused (finished earlier with the same config)"
        else:
            _prepare(exp_dir, config_hash, cfg_json, force)
            (exp_dir / "done.json").unlink(missing_ok=True)
            ctx = RunContext(out_dir=exp_dir, config_hash=config_hash, bar=bar)
            t0 = time.perf_counter()
            summary = exp.run(cfg, ctx)
            atomic_write_text(exp_dir / "summary.md", summary + "\n")
            record = {"experiment": name, "mode": mode, "config": cfg_json, "config_hash": config_hash,
                      "seconds": time.perf_counter() - t0, "units_reused": ctx.units_done, **prov,
                      "outputs": file_manifest(exp_dir, _outputs(exp_dir))}
            atomic_write_text(exp_dir / "done.json", json.dumps(record, indent=2))
            status = f"ran in {record['seconds']:.1f} s ({ctx.units_done} stored units reused)"
        summary = (exp_dir / "summary.md").read_text()
        sections.append(
            f"## {exp.title}\n\n`{name}`: {status}. Commit `{record.get('git_commit')}`, kama "
            f"{record.get('kama_version')}, torch {record.get('torch')}, {record.get('time_utc')}.\n\n{summary}"
        )
    bar.close()
    head = (
        f"# kama-nn: reproduction report ({mode} mode)\n\n"
        f"Generated {prov['time_utc']} by `kama reproduce --{mode}` at commit `{prov['git_commit']}` "
        f"(kama {prov['kama_version']}, torch {prov['torch']}, Python {prov['python']}, {prov['cpus']} CPUs).\n"
        f"Every experiment folder holds its CSVs, figure, `config.json` and `done.json` (config, seeds, commit).\n"
    )
    report = out / "report.md"
    atomic_write_text(report, head + "\n" + "\n\n".join(sections) + "\n")
    return report
