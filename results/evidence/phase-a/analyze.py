"""Phase A's table and choice, by the rule of PROTOCOL.md, from the finished runs of both study folders.

    python results/evidence/phase-a/analyze.py [--write results/evidence/phase-a/RESULTS.md]

Final return of a run: the mean of its last three evaluations. Per variant: the IQM over seeds with a 95 %
bootstrap interval (seeds resampled; ``kama.experiments.rl_policies.iqm_with_ci``), mean +/- std, and the mean
approx_kl / clip fraction of every PPO update (``updates.csv``) against the MLP's under the same normalization.
Only runs that the study runner counts as finished are read; missing ones are listed.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from kama.experiments.rl_policies import iqm_with_ci
from kama.rl.study import expand, load_study_config, run_id, run_problem

HERE = Path(__file__).resolve().parent
FOLDERS = [(HERE / "study_s012.json", HERE / "s012"), (HERE / "study_s34.json", HERE / "s34")]


def variant(run) -> tuple[str, bool]:
    """(name, normalized) of a run: the architecture and, for KAMA, its angle gain and planes."""
    if run.architecture != "kama":
        return run.architecture, run.normalize
    gain = "paper gain" if run.angle_gain == 1.0 else f"gain {run.angle_gain}"
    return f"kama ({gain}, {run.plane_sampler} planes)", run.normalize


def read(folder: Path) -> tuple[float, float, float]:
    """(final return, mean approx_kl, mean clip fraction) of a run folder."""
    with open(folder / "returns.csv") as f:
        returns = [float(r["mean_return"]) for r in csv.DictReader(f)]
    if not (folder / "updates.csv").exists():  # a run copied from an evidence study made before updates.csv
        return float(np.mean(returns[-3:])), float("nan"), float("nan")
    with open(folder / "updates.csv") as f:
        ups = list(csv.DictReader(f))
    return (float(np.mean(returns[-3:])), float(np.mean([float(u["approx_kl"]) for u in ups])),
            float(np.mean([float(u["clip_fraction"]) for u in ups])))


def _mean_known(values: list[float]) -> float:
    """The mean of the values that were measured (NaN if none was)."""
    known = [v for v in values if not np.isnan(v)]
    return float(np.mean(known)) if known else float("nan")


def _ratio(value: float, mlp: float | None) -> str:
    """``value (value / mlp)``, or n/a where a run set had no ``updates.csv``."""
    if np.isnan(value):
        return "n/a"
    return f"{value:.4f}" + (f" ({value / mlp:.2f})" if mlp is not None and not np.isnan(mlp) else "")


def main() -> None:
    """Print (and with ``--write`` store) the table and the rule's outcome."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    rows: dict[tuple[str, bool], list[tuple[int, float, float, float]]] = {}
    missing = []
    for cfg_path, folder in FOLDERS:
        for run in expand(load_study_config(cfg_path)):
            f = folder / run_id(run)
            if run_problem(f, run) is not None:
                missing.append(run_id(run))
                continue
            rows.setdefault(variant(run), []).append((run.seed, *read(f)))
    stats = {}
    for key, rs in rows.items():
        finals = np.array([r[1] for r in rs])
        mid, lo, hi = iqm_with_ci(finals[:, None])
        stats[key] = {"n": len(rs), "iqm": mid, "lo": lo, "hi": hi, "mean": finals.mean(), "std": finals.std(),
                      "kl": _mean_known([r[2] for r in rs]), "clip": _mean_known([r[3] for r in rs]),
                      "finals": [round(x) for x in finals]}
    lines = ["| variant | VecNormalize | seeds | IQM [95 % CI] | mean +/- std | finals | approx_kl (x MLP) | "
             "clip fraction (x MLP) |", "|---|---|---|---|---|---|---|---|"]
    for key in sorted(stats, key=lambda k: (k[1], k[0])):
        s = stats[key]
        mlp = stats.get(("mlp", key[1]))
        kl, clip = _ratio(s["kl"], mlp["kl"] if mlp else None), _ratio(s["clip"], mlp["clip"] if mlp else None)
        lines.append(f"| {key[0]} | {'yes' if key[1] else 'no'} | {s['n']} | {s['iqm']:.0f} [{s['lo']:.0f}, "
                     f"{s['hi']:.0f}] | {s['mean']:.0f} +/- {s['std']:.0f} | {s['finals']} | {kl} | {clip} |")
    lines += [""]
    # the rule: under VecNormalize, the highest IQM; within 5 % of it, the KL / clip closest to the MLP's, then the
    # fewest changes from the paper
    kama = {k: v for k, v in stats.items() if k[0].startswith("kama") and k[1]}
    mlp = stats.get(("mlp", True))
    # the rule reads the KAMA variants and the MLP under VecNormalize; it is applied once all of those have
    # finished (the other runs are reported as they stand)
    needed = [m for m in missing if m.endswith(tuple(f"-vn__s{s}" for s in range(10)))
              and ("__kama-" in m or "__mlp-" in m)]
    if missing:
        lines.append(f"Unfinished runs ({len(missing)} of {len(missing) + sum(s['n'] for s in stats.values())}): "
                     + ", ".join(missing) + ".")
    if needed:
        lines.append(f"The rule is applied once the {len(needed)} unfinished KAMA / MLP runs under VecNormalize "
                     "have finished.")
    if not needed and kama and mlp:
        best = max(v["iqm"] for v in kama.values())
        close = [k for k, v in kama.items() if v["iqm"] >= 0.95 * best]

        def step_distance(k: tuple[str, bool]) -> float:
            return 0.5 * (abs(kama[k]["kl"] / mlp["kl"] - 1) + abs(kama[k]["clip"] / mlp["clip"] - 1))

        def changes(k: tuple[str, bool]) -> int:
            return ("paper gain" not in k[0]) + ("iid planes" not in k[0])

        chosen = sorted(close, key=lambda k: (step_distance(k), changes(k)))[0]
        lines.append(f"Highest IQM under VecNormalize: {best:.0f}. Within 5 % of it: "
                     + ", ".join(f"{k[0]} ({kama[k]['iqm']:.0f}; step distance to the MLP "
                                 f"{step_distance(k):.2f})" for k in close)
                     + f". Chosen by the rule: **{chosen[0]}** with VecNormalize.")
    text = "\n".join(lines)
    print(text)
    if args.write:
        args.write.write_text("# Phase A results\n\nMade by `python results/evidence/phase-a/analyze.py --write "
                              "results/evidence/phase-a/RESULTS.md` from the finished runs in `s012/` and `s34/`.\n\n"
                              + text + "\n")


if __name__ == "__main__":
    main()
