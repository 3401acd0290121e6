r"""Compact RL policies (paper section 6.2-6.3): learning curves (Figures 3-4), the K ablation (Figure 5), learned
vs random planes (6.3), aggregate IQM with stratified-bootstrap confidence intervals, and Table 1 computed
from the actual models.

Quick mode is a tiny real study (PPO on InvertedPendulum-v5, the three architectures, two seeds); full mode is
the paper's study (MuJoCo v5 tasks, PPO and TRPO, five seeds, one million steps): about 75 CPU-hours, meant for
``kama rl study --backend ray`` on a cluster or for a long run (interrupt and rerun: finished runs are kept).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .._checks import check_choice, check_int
from .base import Experiment, RunContext, register, write_csv
from .plotting import plot_curves

LABEL = {"kama": "KAMA", "toeplitz": "Toeplitz", "mlp": "unstructured"}
ARCH_ORDER = ("kama", "toeplitz", "mlp")


def _variant(r: Any) -> str:
    """Architecture of a run as reported: ``"kama"``, ``"toeplitz"``, ``"mlp"``, with the run id's tags for what
    sets a run apart: ``-g...`` (a KAMA angle gain other than 1), ``-live`` (live planes), ``-sc`` (a structured
    critic), ``-vn`` (``VecNormalize``)."""
    from ..rl.study import _kama_tags

    v = r.architecture
    if v == "kama":
        v += _kama_tags(r)
    if getattr(r, "structured_critic", False) and r.architecture != "mlp":
        v += "-sc"
    if getattr(r, "normalize", False):
        v += "-vn"
    return v


_TAGS = {"live": "live planes", "sc": "structured critic", "vn": "VecNormalize"}


def _tags(variant: str) -> list[str]:
    return variant.split("-")[1:]


def _label(variant: str) -> str:
    base, tags = variant.split("-")[0], _tags(variant)
    words = [("dense gain" if t == "gdense" else f"gain {t[1:]}") if t.startswith("g") else _TAGS.get(t, t)
             for t in tags]
    return LABEL[base] + (f" ({', '.join(words)})" if words else "")


def _order(variant: str) -> tuple[int, str]:
    return ARCH_ORDER.index(variant.split("-")[0]), variant


PAPER_TABLE1 = {"HalfCheetah-v5": (15, 7), "Walker2d-v5": (15, 7), "Hopper-v5": (17, 8)}


@dataclass(frozen=True)
class RLConfig:
    """Configuration of the RL experiment (the fields of :class:`kama.rl.study.StudyConfig`, plus the
    process count and the Table 1 tasks).

    Attributes:
        study: keyword arguments of ``StudyConfig``.
        workers: local worker processes (0: every core).
        table_tasks: tasks of Table 1 (parameters counted from models; no training).
        table_rotations: K per algorithm for Table 1 (paper: PPO 200, TRPO 100).
    """

    study: dict[str, Any] = field(default_factory=dict)
    workers: int = 0
    table_tasks: tuple[str, ...] = ("HalfCheetah-v5", "Walker2d-v5", "Hopper-v5")
    table_rotations: dict[str, int] = field(default_factory=lambda: {"ppo": 200, "trpo": 100})

    def __post_init__(self) -> None:
        from ..rl.study import load_study_config
        from ..rl.train import ALGORITHMS

        if not isinstance(self.study, dict):
            raise TypeError(f"study must be a mapping of StudyConfig fields, got {self.study!r}")
        try:
            load_study_config(self.study)  # types and ranges; check_runs validates every run before any work
        except (TypeError, ValueError) as e:
            raise type(e)(f"study: {e}") from None
        check_int("workers", self.workers, minimum=0)
        if not isinstance(self.table_tasks, tuple | list) or not all(isinstance(t, str) for t in self.table_tasks):
            raise TypeError(f"table_tasks must be a list of gymnasium ids, got {self.table_tasks!r}")
        if not isinstance(self.table_rotations, dict) or not self.table_rotations:
            raise TypeError(f'table_rotations must be a mapping like {{"ppo": 200}}, got {self.table_rotations!r}')
        for algo, k in self.table_rotations.items():
            check_choice("table_rotations (its keys)", algo, ALGORITHMS)
            check_int(f"table_rotations[{algo!r}]", k, minimum=1)


QUICK = RLConfig(study={"tasks": ["InvertedPendulum-v5"], "algos": ["ppo"], "architectures": ["kama", "toeplitz",
                                                                                              "mlp"],
                        "seeds": [0, 1], "total_timesteps": 20_000, "eval_every": 2_000, "eval_episodes": 5,
                        "algo_kwargs": {"ppo": {"n_steps": 512, "batch_size": 64}}})
FULL = RLConfig(study={"tasks": ["InvertedPendulum-v5", "InvertedDoublePendulum-v5", "Swimmer-v5", "Hopper-v5",
                                 "HalfCheetah-v5", "Walker2d-v5"], "algos": ["ppo", "trpo"],
                       "architectures": ["kama", "toeplitz", "mlp"], "seeds": [0, 1, 2, 3, 4],
                       "total_timesteps": 1_000_000, "eval_every": 20_000, "eval_episodes": 10})


def read_returns(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps, mean_return)`` arrays of one run folder."""
    with open(folder / "returns.csv") as f:
        rows = list(csv.DictReader(f))
    return (np.array([int(r["timesteps"]) for r in rows]), np.array([float(r["mean_return"]) for r in rows]))


def iqm_with_ci(scores: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Interquartile mean of ``scores (runs, tasks)`` and a 95 % stratified-bootstrap interval (runs resampled
    within each task), as rliable computes them."""
    from scipy import stats

    def iqm(x: np.ndarray) -> float:
        return float(stats.trim_mean(x.reshape(-1), 0.25))

    rng = np.random.default_rng(seed)
    n = scores.shape[0]
    boot = [iqm(scores[np.asarray(rng.integers(0, n, size=n))[:, None], np.arange(scores.shape[1])[None, :]])
            for _ in range(reps)]
    return iqm(scores), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def table1(cfg: RLConfig) -> list[dict[str, Any]]:
    """Actor parameter ratios structured / unstructured from the actual models (no training)."""
    from stable_baselines3 import PPO

    from ..rl import KamaActorCriticPolicy, actor_parameter_count

    rows = []
    for algo, k in cfg.table_rotations.items():
        hidden = cfg.study.get("hidden", {"ppo": 64, "trpo": 32}).get(algo, 64)
        for task in cfg.table_tasks:
            counts = {}
            for arch in ("kama", "toeplitz", "mlp"):
                model = PPO(KamaActorCriticPolicy, task, device="cpu",
                            policy_kwargs={"architecture": arch, "hidden": hidden, "num_rotations": k})
                counts[arch] = actor_parameter_count(model.policy)
            rows.append({"algo": algo, "task": task, "hidden": hidden, "K": k, "kama_params": counts["kama"],
                         "toeplitz_params": counts["toeplitz"], "mlp_params": counts["mlp"],
                         "kama_ratio": counts["kama"] / counts["mlp"],
                         "toeplitz_ratio": counts["toeplitz"] / counts["mlp"]})
    return rows


def _curves(runs: list[Any], folders: list[Path]) -> dict[tuple, list[tuple[np.ndarray, np.ndarray]]]:
    groups: dict[tuple, list[tuple[np.ndarray, np.ndarray]]] = {}
    for r, folder in zip(runs, folders, strict=True):
        key = (r.env_id, r.algo, _variant(r), r.num_rotations, r.learn_planes)
        groups.setdefault(key, []).append(read_returns(folder))
    return groups


def run(cfg: RLConfig, ctx: RunContext) -> str:
    """Run the RL study (resumably) into ``ctx.out_dir``; returns the report section (Markdown)."""
    from ..rl.study import load_study_config, run_study

    study = load_study_config(cfg.study)
    run_study(study, ctx.out_dir / "runs", workers=cfg.workers or None, progress=False)
    ctx.bar.update(1)
    text = report([(study, ctx.out_dir / "runs")], ctx.out_dir, cfg, link_prefix="rl/")
    if len(study.seeds) < 3 or study.total_timesteps < 100_000:
        text += (f"\n\nA small run ({len(study.seeds)} seed(s) x {study.total_timesteps} steps per policy): it shows "
                 "that every policy trains and what the curves look like; it cannot rank the policies, whose "
                 "differences at this budget are within seed-to-seed noise. The multi-seed evidence is in "
                 "`results/evidence/`.")
    return text + f"\n\nConfig: `{asdict(cfg)}`"


def _compared(groups: dict[tuple, Any], what: Literal["rotations", "planes"]) -> dict[tuple, Any]:
    """The KAMA curve groups (keys ``(task, algo, variant, K, learn_planes)``) an ablation figure compares: for
    ``"rotations"`` the random-plane groups of a ``(task, algo, variant)`` run at more than one K; for ``"planes"``
    the groups whose ``(task, algo, variant, K)`` ran with both learned and random planes. Panels with nothing to
    compare are left out of the figure."""
    kama = {k: v for k, v in groups.items() if k[2].startswith("kama")}
    if what == "rotations":
        ks: dict[tuple, set[int]] = {}
        for k in kama:
            if not k[4]:
                ks.setdefault(k[:3], set()).add(k[3])
        return {k: v for k, v in kama.items() if not k[4] and len(ks[k[:3]]) > 1}
    return {k: v for k, v in kama.items() if (*k[:4], not k[4]) in kama}


def report(studies: list[tuple[Any, Path]], out_dir: Path, cfg: RLConfig = QUICK, link_prefix: str = "") -> str:
    """Figures, CSVs and a Markdown summary of finished runs of one or more studies (no training).

    Args:
        studies: ``(StudyConfig, folder)`` pairs; unfinished runs are left out and counted.
        out_dir: where figures and CSVs go.
        cfg: supplies the Table 1 tasks and K.
        link_prefix: prefix of the image links in the returned Markdown.
    """
    from ..rl.study import expand, run_id, run_problem

    runs, folders, missing, damaged, seen = [], [], 0, [], set()
    for study, folder in studies:
        for r in expand(study):
            key = (r.env_id, r.algo, _variant(r), r.num_rotations, r.learn_planes, r.seed)
            if key in seen:  # the same run listed by two studies (e.g. shared baselines) counts once
                continue
            f = Path(folder) / run_id(r)
            why = run_problem(f, r)
            if why is None:
                seen.add(key)
                runs.append(r)
                folders.append(f)
            else:
                missing += 1
                if why not in ("not started", "not finished"):
                    damaged.append(f"{run_id(r)}: {why}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not runs:
        return f"No finished run yet ({missing} unfinished)."
    groups = _curves(runs, folders)
    default_k = {(r.env_id, r.algo): r.num_rotations for r in reversed(runs) if r.architecture == "kama"}
    main = {k: v for k, v in groups.items()
            if not k[4] and (not k[2].startswith("kama") or k[3] == default_k.get(k[:2]))}
    plot_curves(main, out_dir / "learning_curves.png",
                 "Figures 3-4: KAMA vs Toeplitz vs unstructured policies (mean +/- std over seeds)",
                 lambda k: _label(k[2]))
    extra = [f"![learning curves]({link_prefix}learning_curves.png)", ""]
    if missing:
        extra += [f"{missing} run(s) not finished yet are left out.", ""]
    if damaged:
        extra += ["Left out as damaged or made with another config (rerun the study to redo them):", ""]
        extra += [f"- {line}" for line in damaged] + [""]
    abl = _compared(groups, "rotations")
    if abl:
        many = len({k[2] for k in abl}) > 1
        plot_curves(abl, out_dir / "k_ablation.png", "Figure 5: number of rotations K",
                    lambda k: (f"{_label(k[2])}, " if many else "") + f"K = {k[3]}")
        extra += [f"![K ablation]({link_prefix}k_ablation.png)", ""]
    pl = _compared(groups, "planes")
    if pl:
        plot_curves(pl, out_dir / "planes.png", "Section 6.3: learned vs random planes",
                     lambda k: ("learned" if k[4] else "random") + f" planes, K = {k[3]}"
                     + (f" ({_label(k[2])})" if len({q[2] for q in pl}) > 1 else ""))
        extra += [f"![planes]({link_prefix}planes.png)", ""]
    finals: list[dict[str, Any]] = []
    for r, folder in zip(runs, folders, strict=True):
        _, y = read_returns(folder)
        finals.append({"task": r.env_id, "algo": r.algo, "architecture": _variant(r), "K": r.num_rotations,
                       "learn_planes": r.learn_planes, "seed": r.seed, "final_return": float(np.mean(y[-3:]))})
    write_csv(out_dir / "final_returns.csv", finals)
    t1 = table1(cfg)
    write_csv(out_dir / "table1.csv", t1)
    lines = extra + ["Final return (mean of the last three evaluations; mean +/- std over seeds):", "",
                     "| task | algo | architecture | K | planes | final return | seeds |",
                     "|---|---|---|---|---|---|---|"]
    keys = sorted({(f["task"], f["algo"], f["architecture"], f["K"], f["learn_planes"]) for f in finals})
    for group in keys:
        vals = [f["final_return"] for f in finals if (f["task"], f["algo"], f["architecture"], f["K"],
                                                       f["learn_planes"]) == group]
        k_cell = group[3] if group[2].startswith("kama") else "-"
        lines.append(f"| {group[0]} | {group[1]} | {_label(group[2])} | {k_cell} | "
                     f"{'learned' if group[4] else 'random'} | {np.mean(vals):.1f} +/- {np.std(vals):.1f} | "
                     f"{len(vals)} |")
    lines += ["", "Aggregate over tasks: IQM of final returns normalized by the unstructured policy's mean on the "
              "same task and algorithm under the same observation / reward normalization, with a 95 % "
              "stratified-bootstrap interval (over the tasks each variant ran on):", "",
              "| algo | architecture | tasks | IQM | 95 % CI |", "|---|---|---|---|---|"]
    for algo in sorted({f["algo"] for f in finals}):
        tasks = sorted({f["task"] for f in finals if f["algo"] == algo})
        for arch in sorted({f["architecture"] for f in finals if f["algo"] == algo}, key=_order):
            mlp = "mlp-vn" if "vn" in _tags(arch) else "mlp"
            base = {t: np.mean([f["final_return"] for f in finals if f["algo"] == algo and f["task"] == t
                                and f["architecture"] == mlp] or [np.nan]) for t in tasks}
            cols = {t: [f["final_return"] / base[t] for f in finals if f["algo"] == algo and f["task"] == t
                        and f["architecture"] == arch and not f["learn_planes"]
                        and (not arch.startswith("kama") or f["K"] == default_k.get((t, algo)))] for t in tasks}
            cols = {t: c for t, c in cols.items() if c}  # the tasks this variant was run on
            n = min((len(c) for c in cols.values()), default=0)
            if n == 0 or any(not np.isfinite(base[t]) or base[t] == 0 for t in cols):
                continue
            mid, lo, hi = iqm_with_ci(np.array([c[:n] for c in cols.values()]).T)
            lines.append(f"| {algo} | {_label(arch)} | {len(cols)} | {mid:.3f} | [{lo:.3f}, {hi:.3f}] |")
    lines += ["", "Table 1 (actor parameters relative to the unstructured actor, counted from the models; "
              "paper's values in brackets):", "", "| algo | task | h | K | KAMA | Toeplitz |",
              "|---|---|---|---|---|---|"]
    for row in t1:
        paper = PAPER_TABLE1.get(row["task"]) if row["algo"] == "ppo" else None
        p = f" ({paper[0]} %)" if paper else ""
        q = f" ({paper[1]} %)" if paper else ""
        lines.append(f"| {row['algo']} | {row['task']} | {row['hidden']} | {row['K']} | "
                     f"{100 * row['kama_ratio']:.1f} %{p} | {100 * row['toeplitz_ratio']:.1f} %{q} |")
    return "\n".join(lines)


def check_runs(cfg: RLConfig) -> None:
    """Validate every run of the study (environments included) before any training."""
    from ..rl.study import expand, load_study_config

    try:
        expand(load_study_config(cfg.study))
    except (TypeError, ValueError) as e:
        raise type(e)(f"study: {e}") from None


EXPERIMENT = register(Experiment(
    name="rl",
    title="Compact RL policies: learning curves, K ablation, planes, IQM, Table 1 (section 6.2-6.3)",
    configs={"quick": QUICK, "full": FULL},
    run=run,
    num_units=lambda c: 1,
    check=check_runs,
))
