"""``kama reproduce``: run every registered experiment, resumably, and write ``report.md``."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .base import REGISTRY, RunContext, atomic_write_text, provenance

__all__ = ["reproduce", "load_experiments"]


def load_experiments() -> dict[str, Any]:
    """Import the experiment modules (each registers itself) and return the registry."""
    from . import capacity, kernels, manifold  # noqa: F401

    try:  # the RL experiment needs the rl extra (stable-baselines3, sb3-contrib, gymnasium[mujoco])
        from . import es, rl  # noqa: F401
    except ImportError:  # pragma: no cover - without the rl extra
        pass

    return REGISTRY


def _config_json(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


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
    total = sum(registry[n].num_units(cfgs[n]) for n in names)
    bar = tqdm(total=total, desc=f"kama reproduce --{mode}", unit="unit", disable=not progress)
    prov = provenance()
    sections = []
    for name in names:
        exp = registry[name]
        cfg = cfgs[name]
        exp_dir = out / name
        done_path = exp_dir / "done.json"
        cfg_json = _config_json(cfg)
        record = None
        if done_path.exists() and not force:
            try:
                record = json.loads(done_path.read_text())
            except json.JSONDecodeError:
                record = None
            if record is not None and record.get("config") != cfg_json:
                record = None
        if record is not None and (exp_dir / "summary.md").exists():
            bar.update(exp.num_units(cfg))
            status = "reused (finished earlier with the same config)"
        else:
            if force and exp_dir.exists():
                for p in (exp_dir / "units").glob("*.json"):
                    p.unlink()
            stale = exp_dir / "config.json"
            if stale.exists() and json.loads(stale.read_text()).get("config") != cfg_json:
                for p in (exp_dir / "units").glob("*.json"):  # units of another config are not reusable
                    p.unlink()
            atomic_write_text(stale, json.dumps({"config": cfg_json}, indent=2))
            ctx = RunContext(out_dir=exp_dir, bar=bar)
            t0 = time.perf_counter()
            summary = exp.run(cfg, ctx)
            record = {"experiment": name, "mode": mode, "config": cfg_json, "seconds": time.perf_counter() - t0,
                      "units_reused": ctx.units_done, **prov}
            atomic_write_text(exp_dir / "summary.md", summary + "\n")
            atomic_write_text(done_path, json.dumps(record, indent=2))
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
