r"""A sweep of RL runs (tasks x algorithms x architectures x K x planes x seeds) that survives interruption.

Every run writes its own folder (``returns.csv``, ``config.json``, ``model.zip``); a run whose
``config.json`` says ``"finished": true`` is never redone, an unfinished one is restarted from scratch.
Runs are independent processes: a local process pool by default (one torch thread each, every core used), or
Ray tasks on a cluster (``backend="ray"``; ``RAY_ADDRESS`` or ``ray_address`` selects it, else a local Ray
instance is started).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .._checks import check_choice, check_int
from .policies import ARCHITECTURES
from .train import ALGORITHMS, RunConfig, train, validate

__all__ = ["StudyConfig", "load_study_config", "expand", "run_id", "is_finished", "run_study", "BACKENDS"]

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


def load_study_config(source: str | Path | dict[str, Any]) -> StudyConfig:
    """A :class:`StudyConfig` from a JSON file or a dict; unknown keys are an error."""
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
    for key in ("tasks", "algos", "architectures", "seeds", "num_rotations", "learn_planes"):
        if key in data:
            if not isinstance(data[key], (list, tuple)) or not data[key]:
                raise ValueError(f"{key} must be a non-empty list, got {data[key]!r}")
            data[key] = tuple(data[key])
    return StudyConfig(**data)


def run_id(cfg: RunConfig) -> str:
    """Folder name of a run: task, algorithm, architecture (with K and planes for KAMA, ``-sc`` for a structured
    critic) and seed."""
    arch = cfg.architecture
    if arch == "kama":
        arch += f"-K{cfg.num_rotations}" + ("-planes" if cfg.learn_planes else "")
    if arch != "mlp" and cfg.structured_critic:
        arch += "-sc"
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
                ks = study.num_rotations if arch == "kama" else study.num_rotations[:1]
                planes = study.learn_planes if arch == "kama" else (False,)
                for k in ks:
                    for lp in planes:
                        for seed in study.seeds:
                            runs.append(RunConfig(env_id=task, algo=algo, architecture=arch, hidden=hidden,
                                                  num_rotations=k, learn_planes=bool(lp),
                                                  structured_critic=bool(study.structured_critic),
                                                  total_timesteps=study.total_timesteps,
                                                  eval_every=study.eval_every, eval_episodes=study.eval_episodes,
                                                  seed=seed, algo_kwargs=dict(study.algo_kwargs.get(algo, {}))))
    seen = set()
    for r in runs:
        if (key := run_id(r)) in seen:
            raise ValueError(f"the study lists run {key} twice (repeated values in its tuples)")
        seen.add(key)
        validate(r)
    return runs


def is_finished(folder: Path) -> bool:
    """Whether ``folder`` holds a finished run."""
    try:
        return bool(json.loads((folder / "config.json").read_text()).get("finished"))
    except (OSError, json.JSONDecodeError):
        return False


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
              ray_address: str | None = None, progress: bool = True) -> list[Path]:
    """Run every unfinished run of ``study`` under ``out`` and return all run folders.

    Args:
        study: the sweep.
        out: output folder (one subfolder per run, see :func:`run_id`).
        backend: ``"local"`` (a process pool) or ``"ray"``.
        workers: local worker processes (default: every core).
        ray_address: Ray cluster address (default: ``RAY_ADDRESS``, else a local instance).
        progress: show a progress bar over runs.
    """
    backend = check_choice("backend", backend, BACKENDS)
    runs = expand(study)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(dataclasses.asdict(study), indent=2))
    folders = {run_id(r): out / run_id(r) for r in runs}
    todo = [r for r in runs if not is_finished(folders[run_id(r)])]
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
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_run_one, r, str(folders[run_id(r)])): r for r in todo}
        for fut in as_completed(futures):
            fut.result()
            bar.set_postfix_str(run_id(futures[fut]))
            bar.update(1)


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
