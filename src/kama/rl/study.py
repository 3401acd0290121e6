r"""A sweep of RL runs (tasks x algorithms x architectures x K x planes x seeds) that survives interruption.

Every run writes its own folder (``returns.csv``, ``config.json``, ``model.zip``). A run counts as finished only
if its ``config.json`` says ``"finished": true``, holds the same config the study now asks for, and its files
are complete (the digests recorded at the end of training, a parsable ``returns.csv`` that reaches the run's
step budget, a valid ``model.zip``); an unfinished or damaged run is restarted from scratch (with a
:class:`~kama.records.StaleResultWarning` when it was damaged). A finished run made with another config is
never overwritten silently: the study refuses, naming the runs and the fields that differ, unless asked to
rerun them (``rerun_changed=True``, ``kama rl study --rerun-changed``). One study process writes to a folder
at a time (:class:`~kama.records.FolderLock`).

Runs are independent processes: a local process pool by default (one torch thread each, every core used), or
Ray tasks on a cluster (``backend="ray"``; ``RAY_ADDRESS`` or ``ray_address`` selects it, else a local Ray
instance is started).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import shutil
import warnings
import zipfile
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from .._checks import check_bool, check_choice, check_int
from .._optional import require
from ..nn import PAPER_SETTINGS
from ..records import FolderLock, StaleResultWarning, check_manifest
from .policies import ARCHITECTURES
from .train import ALGORITHMS, LEGACY_VALUES, RunConfig, stored_config, train, validate

__all__ = ["StudyConfig", "load_study_config", "expand", "run_id", "is_finished", "run_problem", "config_changes",
           "run_study", "BACKENDS"]

BACKENDS: tuple[str, ...] = ("local", "ray")


@dataclass(frozen=True)
class StudyConfig:
    """A sweep over every combination of the tuples below.

    Attributes:
        tasks: gymnasium ids (Box spaces), e.g. ``("InvertedPendulum-v5", "Hopper-v5")``.
        algos: ``"ppo"`` and/or ``"trpo"``.
        architectures: ``"kama"``, ``"toeplitz"``, ``"mlp"``.
        seeds: seeds, one run each.
        num_rotations: K values for KAMA runs (the Figure 5 ablation); other architectures use the first.
        learn_planes: ``(False,)``, ``(True,)`` or both (section 6.3), for KAMA runs.
        hidden: hidden units per algorithm (paper: PPO 64, TRPO 32).
        total_timesteps, eval_every, eval_episodes: as :class:`kama.rl.train.RunConfig`.
        algo_kwargs: extra PPO / TRPO keyword arguments per algorithm.
        structured_critic: structure the critics of KAMA / Toeplitz runs too (run folders get ``-sc``).
        angle_gain: KAMA angle gains to sweep (``"dense"`` or floats; 1.0 is the paper's; folders get ``-g...``
            for other values).
        plane_sampler: KAMA plane samplers to sweep (``"iid"``, ``"live"``; folders get ``-live``).
        normalize: ``VecNormalize`` settings to sweep, for every architecture (folders get ``-vn``).
    """

    tasks: tuple[str, ...] = ("InvertedPendulum-v5",)
    algos: tuple[str, ...] = ("ppo",)
    architectures: tuple[str, ...] = ARCHITECTURES
    seeds: tuple[int, ...] = (0, 1, 2)
    num_rotations: tuple[int, ...] = (200,)
    learn_planes: tuple[bool, ...] = (False,)
    hidden: dict[str, int] = field(default_factory=lambda: {"ppo": 64, "trpo": 32})
    total_timesteps: int = 100_000
    eval_every: int = 10_000
    eval_episodes: int = 5
    algo_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    structured_critic: bool = False
    angle_gain: tuple[float | str, ...] = (RunConfig.angle_gain,)
    plane_sampler: tuple[str, ...] = (RunConfig.plane_sampler,)
    normalize: tuple[bool, ...] = (RunConfig.normalize,)


_TUPLES: dict[str, type | tuple[type, ...]] = {"tasks": str, "algos": str, "architectures": str, "seeds": int,
                                                "num_rotations": int, "learn_planes": bool,
                                                "angle_gain": (int, float, str), "plane_sampler": str,
                                                "normalize": bool}


def _check_study(data: dict[str, Any]) -> dict[str, Any]:
    """Type checks of every field (errors name the field); returns the fields with lists as tuples."""
    out = dict(data)
    for key, kind in _TUPLES.items():
        if key not in out:
            continue
        value = out[key]
        if not isinstance(value, list | tuple) or not value:
            raise ValueError(f"{key} must be a non-empty list, got {value!r}")
        for v in value:
            ok = isinstance(v, kind) and (kind is bool or not isinstance(v, bool))
            if not ok:
                what = kind.__name__ if isinstance(kind, type) else "number or name"
                raise TypeError(f"{key} must be a list of {what} values, got {v!r} in {list(value)!r}")
        if len(set(value)) != len(value):
            raise ValueError(f"{key} must not repeat a value, got {list(value)!r}")
        out[key] = tuple(value)
    for key in ("total_timesteps", "eval_every", "eval_episodes"):
        if key in out:
            check_int(key, out[key], minimum=1)
    if "structured_critic" in out:
        check_bool("structured_critic", out["structured_critic"])
    if "hidden" in out:
        hidden = out["hidden"]
        if not isinstance(hidden, dict) or not all(isinstance(k, str) for k in hidden):
            raise TypeError(f'hidden must be a mapping from algorithm to units, like {{"ppo": 64, "trpo": 32}}, '
                            f"got {hidden!r}")
        for algo, units in hidden.items():
            check_choice("hidden (its keys)", algo, ALGORITHMS)
            check_int(f"hidden[{algo!r}]", units, minimum=1)
    if "algo_kwargs" in out:
        kw = out["algo_kwargs"]
        if not isinstance(kw, dict) or not all(isinstance(v, dict) for v in kw.values()):
            raise TypeError(f'algo_kwargs must be a mapping from algorithm to keyword arguments, like '
                            f'{{"ppo": {{"n_steps": 1024}}}}, got {kw!r}')
        for algo in kw:
            check_choice("algo_kwargs (its keys)", algo, ALGORITHMS)
    return out


def load_study_config(source: str | Path | dict[str, Any]) -> StudyConfig:
    """A :class:`StudyConfig` from a JSON file or a dict; unknown keys and values of the wrong type or range are
    errors naming the field."""
    if isinstance(source, dict):
        data = dict(source)
    else:
        data = json.loads(Path(source).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"a study config must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown study config key(s) {unknown}; known: {sorted(names)}")
    return StudyConfig(**_check_study(data))


def _gain_tag(gain: float | str) -> str:
    return f"-g{gain}" if isinstance(gain, str) else f"-g{float(gain):g}"


def _kama_tags(cfg: RunConfig) -> str:
    """The run-id tags of a KAMA run's layer settings that differ from the paper's (``-g...``, ``-live``)."""
    tags = ""
    gain = cfg.angle_gain
    if not (isinstance(gain, int | float) and float(gain) == PAPER_SETTINGS["angle_gain"]):
        tags += _gain_tag(gain)
    if cfg.plane_sampler != PAPER_SETTINGS["plane_sampler"]:
        tags += f"-{cfg.plane_sampler}"
    return tags


def run_id(cfg: RunConfig) -> str:
    """Folder name of a run: task, algorithm, architecture (for KAMA: K, ``-planes`` for learned planes, ``-g...``
    for an angle gain other than the paper's 1, ``-live`` for live planes; ``-sc`` for a structured critic;
    ``-vn`` for ``VecNormalize``) and seed; the paper's settings add no tag."""
    arch = cfg.architecture
    if arch == "kama":
        arch += f"-K{cfg.num_rotations}" + ("-planes" if cfg.learn_planes else "") + _kama_tags(cfg)
    if arch != "mlp" and cfg.structured_critic:
        arch += "-sc"
    if cfg.normalize:
        arch += "-vn"
    return f"{cfg.env_id}__{cfg.algo}__{arch}__s{cfg.seed}"


def expand(study: StudyConfig) -> list[RunConfig]:
    """Every run of the study, validated (errors before any training)."""
    for algo in study.algos:
        check_choice("algos", algo, ALGORITHMS)
    for arch in study.architectures:
        check_choice("architectures", arch, ARCHITECTURES)
    for k in study.num_rotations:
        check_int("num_rotations", k, minimum=1)
    runs: list[RunConfig] = []
    for task in study.tasks:
        for algo in study.algos:
            hidden = study.hidden.get(algo, 64)
            for arch in study.architectures:
                kama = arch == "kama"
                # the KAMA-only options do not apply to the other architectures: their runs carry the neutral
                # values, so that the same baseline run is the same run in every study
                variants = itertools.product(
                    study.num_rotations if kama else study.num_rotations[:1],
                    study.learn_planes if kama else (False,),
                    study.angle_gain if kama else (LEGACY_VALUES["angle_gain"],),
                    study.plane_sampler if kama else (LEGACY_VALUES["plane_sampler"],),
                    study.normalize, study.seeds)
                for k, lp, gain, sampler, norm, seed in variants:
                    runs.append(RunConfig(env_id=task, algo=algo, architecture=arch, hidden=hidden,
                                          num_rotations=k, learn_planes=bool(lp),
                                          structured_critic=bool(study.structured_critic), angle_gain=gain,
                                          plane_sampler=sampler, normalize=bool(norm),
                                          total_timesteps=study.total_timesteps, eval_every=study.eval_every,
                                          eval_episodes=study.eval_episodes, seed=seed,
                                          algo_kwargs=dict(study.algo_kwargs.get(algo, {}))))
    seen = set()
    for r in runs:
        if (key := run_id(r)) in seen:
            raise ValueError(f"the study lists run {key} twice (repeated values in its tuples)")
        seen.add(key)
        validate(r)
    return runs


def _effective(config: dict[str, Any]) -> dict[str, Any]:
    """A run config without the fields its architecture ignores (K and planes outside KAMA, the critic's structure
    for the dense baseline)."""
    arch = config.get("architecture")
    drop = set() if arch == "kama" else {"num_rotations", "learn_planes", "angle_gain", "plane_sampler"}
    if arch == "mlp":
        drop.add("structured_critic")
    return {k: v for k, v in config.items() if k not in drop}


def config_changes(stored: object, cfg: RunConfig) -> list[str]:
    """The fields in which a run's stored ``config.json`` config differs from ``cfg``, as ``"field: old -> new"``
    (fields added to :class:`~kama.rl.train.RunConfig` after a run was made count with the value that
    reproduces the old behaviour)."""
    old = _effective(stored_config(stored))
    new = _effective(json.loads(json.dumps(dataclasses.asdict(cfg))))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _returns_problem(path: Path, total_timesteps: int | None) -> str | None:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return f"returns.csv cannot be read ({e})"
    if not rows or not {"timesteps", "mean_return"} <= set(rows[0]):
        return "returns.csv has no evaluation rows"
    try:
        steps = [int(r["timesteps"]) for r in rows]
        values = [float(r["mean_return"]) for r in rows]
    except (TypeError, ValueError) as e:
        return f"returns.csv holds a value that is not a number ({e})"
    if not all(math.isfinite(v) for v in values):
        return "returns.csv holds a non-finite return"
    if steps != sorted(steps) or (total_timesteps is not None and steps[-1] < total_timesteps):
        return f"returns.csv ends at step {steps[-1]} of {total_timesteps}"
    return None


def run_problem(folder: str | Path, cfg: RunConfig | None = None) -> str | None:
    """``None`` if ``folder`` holds a finished, intact run (of ``cfg``, when given), else why not (one line).

    Checked: ``config.json`` says finished (and holds ``cfg``), the files' digests recorded at the end of
    training, ``returns.csv`` parses with finite returns up to the step budget, ``model.zip`` is a valid zip."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        return "not started"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"config.json is not valid JSON ({e})"
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        return "config.json is not a run record"
    if meta.get("finished") is not True:
        return "not finished"
    if cfg is not None and (changes := config_changes(meta["config"], cfg)):
        return "made with another config (" + "; ".join(changes) + ")"
    if "outputs" in meta and (bad := check_manifest(folder, meta["outputs"])) is not None:
        return bad
    steps = meta["config"].get("total_timesteps")
    if (bad := _returns_problem(folder / "returns.csv", steps if isinstance(steps, int) else None)) is not None:
        return bad
    try:
        with zipfile.ZipFile(folder / "model.zip") as z:
            if z.testzip() is not None:
                return "model.zip is damaged"
    except (OSError, zipfile.BadZipFile) as e:
        return f"model.zip is missing or not a zip file ({e})"
    return None


def is_finished(folder: str | Path, cfg: RunConfig | None = None) -> bool:
    """Whether ``folder`` holds a finished, intact run (of ``cfg``, when given); see :func:`run_problem`."""
    return run_problem(folder, cfg) is None


def _run_one(cfg: RunConfig, folder: str) -> str:
    import torch

    torch.set_num_threads(1)
    path = Path(folder)
    if path.exists():
        shutil.rmtree(path)  # an interrupted run restarts from scratch: no half-written results survive
    train(cfg, path)
    return folder


def _run_collect(cfg: RunConfig) -> dict[str, bytes]:
    """Train in a scratch folder on whichever machine runs this, and return the files (for Ray workers that do
    not share the driver's file system)."""
    import tempfile

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def run_study(study: StudyConfig, out: str | Path, *, backend: str = "local", workers: int | None = None,
              ray_address: str | None = None, progress: bool = True, rerun_changed: bool = False) -> list[Path]:
    """Run every unfinished run of ``study`` under ``out`` and return all run folders.

    Args:
        study: the sweep.
        out: output folder (one subfolder per run, see :func:`run_id`).
        backend: ``"local"`` (a process pool) or ``"ray"``.
        workers: local worker processes (default: every core).
        ray_address: Ray cluster address (default: ``RAY_ADDRESS``, else a local instance).
        progress: show a progress bar over runs.
        rerun_changed: retrain finished runs whose stored config differs from the study's (default: refuse,
            naming them and the differing fields, before any training).

    Raises:
        ValueError: finished runs of another config (without ``rerun_changed``), or a bad study.
        kama.records.FolderBusyError: another study process is writing to ``out``.
    """
    backend = check_choice("backend", backend, BACKENDS)
    check_bool("rerun_changed", rerun_changed)
    runs = expand(study)
    out = Path(out)
    with FolderLock(out, "kama rl study"):
        folders = {run_id(r): out / run_id(r) for r in runs}
        todo, changed = [], []
        for r in runs:
            folder = folders[run_id(r)]
            why = run_problem(folder, r)
            if why is None:
                continue
            if why.startswith("made with another config"):
                changed.append(f"{run_id(r)}: {why}")
            elif why not in ("not started", "not finished"):
                warnings.warn(f"kama: rerunning {folder}: {why}", StaleResultWarning, stacklevel=2)
            todo.append(r)
        if changed and not rerun_changed:
            more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
            raise ValueError(f"{len(changed)} finished run(s) in {out} were made with another config; use another "
                             f"output folder or rerun them (rerun_changed=True, --rerun-changed): "
                             + " | ".join(changed[:5]) + more)
        (out / "study.json").write_text(json.dumps(dataclasses.asdict(study), indent=2))
        tqdm = require("tqdm.auto", "rl", "kama rl study's progress bar").tqdm
        bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="kama rl study", unit="run",
                   disable=not progress)
        try:
            if backend == "local":
                _run_local(todo, folders, workers or os.cpu_count() or 1, bar)
            else:
                _run_ray(todo, folders, ray_address, bar)
        finally:
            bar.close()
    return list(folders.values())


def _exit_with_parent(parent: int, poll_s: float = 0.5) -> None:
    """Pool-worker initializer: end this worker when the study process that started it dies (killed with
    SIGKILL it cannot shut its pool down, and orphaned workers would go on training and writing)."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="kama-parent-watch", daemon=True).start()


def _run_local(todo: Iterable[RunConfig], folders: dict[str, Path], workers: int, bar: Any) -> None:
    todo = list(todo)
    if not todo:
        return
    if workers == 1:
        for r in todo:
            bar.set_postfix_str(run_id(r))
            _run_one(r, str(folders[run_id(r)]))
            bar.update(1)
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_exit_with_parent,
                               initargs=(os.getpid(),))
    try:
        futures = {pool.submit(_run_one, r, str(folders[run_id(r)])): r for r in todo}
        pending = set(futures)
        while pending:
            # a bounded wait: the main thread comes back to Python often enough to raise KeyboardInterrupt even
            # when the kernel handed SIGINT to another of its threads (a wait without timeout would sleep through
            # it until the next run finished)
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            for fut in done:
                fut.result()
                bar.set_postfix_str(run_id(futures[fut]))
                bar.update(1)
    except BaseException:
        # Interrupted (SIGINT to this process alone) or a run failed: queued runs are dropped and running ones
        # stopped; their folders stay unfinished, and a rerun restarts them. The workers are joined here, with a
        # deadline, rather than through the pool's shutdown, which can wait forever on a worker stopped while it
        # was starting.
        procs = list(getattr(pool, "_processes", {}).values())
        for proc in procs:
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        raise
    pool.shutdown(wait=True)


def _run_ray(todo: Iterable[RunConfig], folders: dict[str, Path], address: str | None, bar: Any) -> None:
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the ray extra
        raise ImportError("backend='ray' needs the ray extra: pip install 'kama-nn[ray]'") from e
    todo = list(todo)
    if not todo:
        return
    started = False
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, ignore_reinit_error=True,
                 include_dashboard=False, log_to_driver=False)
        started = True
    try:
        remote = ray.remote(num_cpus=1)(_run_collect)
        pending = {remote.remote(r): r for r in todo}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                files = ray.get(ref)
                cfg = pending.pop(ref)
                folder = folders[run_id(cfg)]
                if folder.exists():
                    shutil.rmtree(folder)
                folder.mkdir(parents=True)
                for name in sorted(files, key=lambda n: n == "config.json"):  # config.json last: "finished"
                    tmp = folder / f".{name}.tmp"
                    tmp.write_bytes(files[name])
                    tmp.replace(folder / name)
                bar.set_postfix_str(run_id(cfg))
                bar.update(1)
    finally:
        if started:
            ray.shutdown()
