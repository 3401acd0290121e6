r"""Random KAMA-NNs as PNG-kernel estimators (paper section 4 and 6.1).

* ``kernel_approx``: Figure 1 (empirical MSE of pointwise angular-kernel estimates on boston and wine) and
  Figure 2 (relative Frobenius error :math:`\lVert K - \hat K\rVert_F / \lVert K \rVert_F` of the angular kernel
  matrix on g50c, boston, cpu, insurance, wine, parkinson), URN / HORN / KAMA (k = 5 d ln d) / ORN, against
  the number of features (multiples of d, stacked independent blocks). N = min(550, n) random points, r
  repetitions (1000 in full mode). Columns z-scored then rows unit-normalized by default (``standardize``).
* ``png_gap``: Theorems 1-2: the MSE gap ``MSE(URN) - MSE(ORN or KRN)`` times d against d for f = sign,
  ReLU, tanh, cos (m = d features, pairs of unit vectors at angle pi/3); the URN MSE is exact (quadrature).
* ``k_ablation``: MSE of KRN against k / (d ln d), converging to ORN's.
* ``feature_speed``: featurization time (sampling included) of the four samplers against d.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from .. import datasets
from ..features import SAMPLERS, random_matrix
from ..png import png_kernel, png_kernel_quadrature
from .base import Experiment, RunContext, check_fields, register, write_csv
from .plotting import log_xticks, pyplot

LABELS = {"gaussian": "URN", "hadamard": "HORN", "kama": "KAMA", "orthogonal": "ORN", "kama_blocked": "KAMA (blocked)"}
ORDER = ("gaussian", "hadamard", "kama", "orthogonal")
_DATASETS = datasets.NAMES + datasets.ALTERNATIVES


def subset(name: str, n_points: int, standardize: bool, seed: int) -> torch.Tensor:
    """``min(n_points, n)`` random rows of a packaged dataset, prepared for the angular kernel (float64)."""
    X, _ = datasets.load(name)
    X = datasets.prepare(X, standardize=standardize)
    rng = np.random.default_rng(seed)
    idx = rng.choice(X.shape[0], size=min(n_points, X.shape[0]), replace=False)
    return torch.from_numpy(X[np.sort(idx)])


def gram_errors(X: torch.Tensor, sampler: str, blocks: int, reps: int, seed: int) -> dict[str, list[float]]:
    """Errors of the angular-kernel Gram estimate with ``j d`` features, ``j = 1..blocks`` (nested blocks).

    Returns per ``j``: mean and standard deviation over ``reps`` of the relative Frobenius error, and the mean
    squared error over off-diagonal entries (the pointwise MSE averaged over pairs).
    """
    n, d = X.shape
    K = png_kernel(X, X, "angular").float()
    k_norm = float(K.norm())
    k_diag = torch.diagonal(K).clone()
    gen = torch.Generator().manual_seed(seed)
    rel = np.zeros((reps, blocks))
    mse = np.zeros((reps, blocks))
    Xf = X.float()
    for r in range(reps):
        acc = torch.zeros(n, n)
        for b in range(blocks):
            w = random_matrix(sampler, d, d, generator=gen, dtype=torch.float32)
            s = torch.sign(w.apply(Xf))
            acc.addmm_(s, s.T)  # integer-valued: exact in float32
            c = 1.0 / ((b + 1) * d)
            frob2 = float(torch.dist(acc * c, K)) ** 2
            diag2 = float((torch.diagonal(acc) * c - k_diag).pow(2).sum())
            rel[r, b] = math.sqrt(frob2) / k_norm
            mse[r, b] = (frob2 - diag2) / (n * (n - 1)) if n > 1 else 0.0
    return {"rel_mean": rel.mean(0).tolist(), "rel_std": rel.std(0).tolist(), "mse_mean": mse.mean(0).tolist(),
            "mse_std": mse.std(0).tolist()}


# ----------------------------------------------------------------------------------------------------------
# Figures 1 and 2
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelApproxConfig:
    """Configuration of Figures 1-2.

    Attributes:
        datasets: datasets of Figure 2 (Figure 1 uses ``fig1_datasets``).
        fig1_datasets: datasets of Figure 1.
        samplers: estimators compared.
        n_points: N, the number of random points per dataset (min(N, n) are used).
        reps: r, repetitions per estimator.
        blocks: number of feature counts: d, 2d, ..., blocks * d.
        standardize: z-score the columns before normalizing the rows (else raw values).
        seed: base seed.
    """

    datasets: tuple[str, ...] = datasets.NAMES
    fig1_datasets: tuple[str, ...] = ("boston", "wine")
    samplers: tuple[str, ...] = ORDER
    n_points: int = 550
    reps: int = 1000
    blocks: int = 8
    standardize: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, {"datasets": ("names", _DATASETS), "fig1_datasets": ("names", _DATASETS),
                            "samplers": ("names", tuple(LABELS)), "n_points": ("int", 2), "reps": ("int", 1),
                            "blocks": ("int", 1), "standardize": ("bool",), "seed": ("int", 0)})


def run_kernel_approx(cfg: KernelApproxConfig, ctx: RunContext) -> str:
    """Figures 1 and 2 into ``ctx.out_dir``; returns the report section (Markdown)."""
    rows = []
    for i, name in enumerate(cfg.datasets):
        X = subset(name, cfg.n_points, cfg.standardize, cfg.seed + i)
        for sampler in cfg.samplers:
            res = ctx.unit(f"{name}_{sampler}", partial(gram_errors, X, sampler, cfg.blocks, cfg.reps,
                                                          cfg.seed + 1000 * (i + 1) + SAMPLERS.index(sampler)))
            for b in range(cfg.blocks):
                rows.append({"dataset": name, "n": X.shape[0], "d": X.shape[1], "sampler": sampler,
                             "label": LABELS[sampler], "features": (b + 1) * X.shape[1], "multiple": b + 1,
                             "rel_frobenius_mean": res["rel_mean"][b], "rel_frobenius_std": res["rel_std"][b],
                             "pointwise_mse_mean": res["mse_mean"][b], "pointwise_mse_std": res["mse_std"][b],
                             "reps": cfg.reps})
    write_csv(ctx.out_dir / "kernel_approx.csv", rows)
    prep = "columns z-scored, rows unit-normalized" if cfg.standardize else "raw columns, rows unit-normalized"
    plt = pyplot()
    # Figure 1: pointwise MSE
    fig1 = [n for n in cfg.fig1_datasets if n in cfg.datasets]
    fig, axes = plt.subplots(1, max(1, len(fig1)), figsize=(5.5 * max(1, len(fig1)), 4.2), squeeze=False)
    for ax, name in zip(axes[0], fig1, strict=False):
        for sampler in cfg.samplers:
            rs = [r for r in rows if r["dataset"] == name and r["sampler"] == sampler]
            ax.plot([r["features"] for r in rs], [r["pointwise_mse_mean"] for r in rs], "o-", label=LABELS[sampler])
        ax.set(xlabel="number of features m", ylabel="MSE of K_ang(x, y) estimates", yscale="log",
               title=f"{name} (N={rs[0]['n']}, d={rs[0]['d']}, r={cfg.reps})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Figure 1: pointwise angular-kernel MSE ({prep})")
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "figure1_pointwise_mse.png", dpi=110)
    plt.close(fig)
    # Figure 2: relative Frobenius error
    cols = 3
    nrow = math.ceil(len(cfg.datasets) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(15, 4 * nrow), squeeze=False)
    for ax, name in zip(axes.flat, cfg.datasets, strict=False):
        for sampler in cfg.samplers:
            rs = [r for r in rows if r["dataset"] == name and r["sampler"] == sampler]
            ax.errorbar([r["multiple"] for r in rs], [r["rel_frobenius_mean"] for r in rs],
                        yerr=[r["rel_frobenius_std"] / math.sqrt(cfg.reps) for r in rs], fmt="o-", ms=4,
                        capsize=2, label=LABELS[sampler])
        ax.set(xlabel="features / d", ylabel="||K - K_hat||_F / ||K||_F", yscale="log",
               title=f"{name} (N={rs[0]['n']}, d={rs[0]['d']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(cfg.datasets):]:
        ax.axis("off")
    fig.suptitle(f"Figure 2: angular kernel matrix, relative Frobenius error, mean of r={cfg.reps} ({prep})")
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "figure2_gram_error.png", dpi=110)
    plt.close(fig)
    # Summary: errors at m = d and the ratios against URN
    lines = ["![Figure 1](kernel_approx/figure1_pointwise_mse.png)", "",
             "![Figure 2](kernel_approx/figure2_gram_error.png)", "",
             f"Relative Frobenius error at m = d and m = {cfg.blocks} d ({prep}; ratio to URN in brackets):", "",
             "| dataset | N | d | " + " | ".join(f"{LABELS[s]} (m=d)" for s in cfg.samplers) + " | "
             + " | ".join(f"{LABELS[s]} (m={cfg.blocks}d)" for s in cfg.samplers) + " |",
             "|---|---|---|" + "---|" * (2 * len(cfg.samplers))]
    for name in cfg.datasets:
        first = {s: next(r for r in rows if r["dataset"] == name and r["sampler"] == s and r["multiple"] == 1)
                 for s in cfg.samplers}
        last = {s: next(r for r in rows if r["dataset"] == name and r["sampler"] == s
                        and r["multiple"] == cfg.blocks) for s in cfg.samplers}
        base1 = first.get("gaussian", first[cfg.samplers[0]])["rel_frobenius_mean"]
        base2 = last.get("gaussian", last[cfg.samplers[0]])["rel_frobenius_mean"]
        r0 = first[cfg.samplers[0]]
        lines.append(f"| {name} | {r0['n']} | {r0['d']} | "
                     + " | ".join(f"{first[s]['rel_frobenius_mean']:.4f} ({first[s]['rel_frobenius_mean'] / base1:.2f})"
                                  for s in cfg.samplers) + " | "
                     + " | ".join(f"{last[s]['rel_frobenius_mean']:.4f} ({last[s]['rel_frobenius_mean'] / base2:.2f})"
                                  for s in cfg.samplers) + " |")
    lines += ["", f"Config: `{asdict(cfg)}`"]
    return "\n".join(lines)


KERNEL_APPROX = register(Experiment(
    name="kernel_approx",
    title="Figures 1 and 2: angular-kernel estimation with URN / HORN / KAMA / ORN (section 6.1)",
    configs={"quick": KernelApproxConfig(reps=50, blocks=4), "full": KernelApproxConfig()},
    run=run_kernel_approx,
    num_units=lambda c: len(c.datasets) * len(c.samplers),
))


# ----------------------------------------------------------------------------------------------------------
# Theorems 1 and 2
# ----------------------------------------------------------------------------------------------------------

FUNCTIONS = {"sign": torch.sign, "relu": torch.relu, "tanh": torch.tanh, "cos": torch.cos}


@dataclass(frozen=True)
class GapConfig:
    """Configuration of the Theorems 1-2 experiment.

    Attributes:
        dims: dimensions d (m = d features).
        functions: names of f (sign, relu, tanh, cos).
        samplers: structured estimators compared with URN (orthogonal, kama).
        pairs: pairs of unit vectors at angle ``angle``, random orientations.
        reps: Monte Carlo repetitions per (d, sampler).
        angle: angle between the two points.
        seed: base seed.
    """

    dims: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    functions: tuple[str, ...] = ("sign", "relu", "tanh", "cos")
    samplers: tuple[str, ...] = ("orthogonal", "kama")
    pairs: int = 32
    reps: int = 600
    angle: float = math.pi / 3
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, {"dims": ("ints", 2), "functions": ("names", tuple(FUNCTIONS)),
                            "samplers": ("names", ("orthogonal", "kama")), "pairs": ("int", 1), "reps": ("int", 2),
                            "angle": ("real", 0.0, math.pi, True), "seed": ("int", 0)})


def _pairs_at_angle(d: int, n: int, angle: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randn(n, d, generator=gen, dtype=torch.float64)
    a = a / a.norm(dim=1, keepdim=True)
    b = torch.randn(n, d, generator=gen, dtype=torch.float64)
    b = b - (b * a).sum(1, keepdim=True) * a
    b = b / b.norm(dim=1, keepdim=True)
    return a, math.cos(angle) * a + math.sin(angle) * b


def _squared(g: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    return g(t) ** 2


def mse_gap(d: int, sampler: str, cfg: GapConfig, seed: int) -> dict[str, Any]:
    """Monte Carlo MSE (times d) of the structured estimator with m = d, for every f, against the exact URN MSE."""
    gen = torch.Generator().manual_seed(seed)
    x, y = _pairs_at_angle(d, cfg.pairs, cfg.angle, gen)
    e1 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    e2 = torch.tensor([[math.cos(cfg.angle), math.sin(cfg.angle)]], dtype=torch.float64)
    out: dict[str, Any] = {"d": d, "sampler": sampler}
    sq = {f: torch.zeros(cfg.pairs, dtype=torch.float64) for f in cfg.functions}  # sums of e^2
    sq2 = {f: torch.zeros(cfg.pairs, dtype=torch.float64) for f in cfg.functions}  # sums of e^4
    exact = {f: float(png_kernel_quadrature(FUNCTIONS[f], e1, e2)) for f in cfg.functions}
    for _ in range(cfg.reps):
        w = random_matrix(sampler, d, d, generator=gen, dtype=torch.float64)
        u, v = w.apply(x), w.apply(y)
        for f in cfg.functions:
            est = (FUNCTIONS[f](u) * FUNCTIONS[f](v)).mean(1)
            e2_ = (est - exact[f]) ** 2
            sq[f] += e2_
            sq2[f] += e2_**2
    for f in cfg.functions:
        k2 = float(png_kernel_quadrature(partial(_squared, FUNCTIONS[f]), e1, e2))
        urn = (k2 - exact[f] ** 2) / d  # exact: Var(f(u) f(v)) / m
        count = cfg.reps * cfg.pairs
        mse = float(sq[f].sum()) / count
        se = math.sqrt(max(float(sq2[f].sum()) / count - mse**2, 0.0) / count)
        out[f"{f}_urn_mse_x_d"] = urn * d
        out[f"{f}_mse_x_d"] = mse * d
        out[f"{f}_gap_x_d"] = (urn - mse) * d
        out[f"{f}_gap_x_d_se"] = se * d
    return out


def run_png_gap(cfg: GapConfig, ctx: RunContext) -> str:
    """The Theorems 1-2 gap study into ``ctx.out_dir``; returns the report section (Markdown)."""
    rows = [ctx.unit(f"d{d}_{s}", partial(mse_gap, d, s, cfg, cfg.seed + d + 7 * SAMPLERS.index(s)))
            for d in cfg.dims for s in cfg.samplers]
    write_csv(ctx.out_dir / "png_gap.csv", rows)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(cfg.functions), figsize=(4.2 * len(cfg.functions), 4), squeeze=False)
    for ax, f in zip(axes[0], cfg.functions, strict=True):
        for s, style in zip(cfg.samplers, ("o-", "s--"), strict=False):
            rs = [r for r in rows if r["sampler"] == s]
            ax.errorbar([r["d"] for r in rs], [r[f"{f}_gap_x_d"] for r in rs],
                        yerr=[2 * r[f"{f}_gap_x_d_se"] for r in rs], fmt=style, capsize=2, label=LABELS[s])
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xscale="log", xlabel="d (m = d features)", ylabel="d (MSE_URN - MSE)", title=f"f = {f}")
        log_xticks(ax, cfg.dims)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Theorems 1-2: the MSE gap behaves like K/d (pairs at angle {cfg.angle:.3f}, "
                 f"{cfg.pairs} pairs x {cfg.reps} draws; bars: 2 s.e.)")
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "png_gap.png", dpi=110)
    plt.close(fig)
    lines = ["![Theorems 1-2](png_gap/png_gap.png)", "", "d x (MSE_URN - MSE) (positive: the structured estimator "
             "is more accurate; roughly constant in d: a gap of order 1/d):", "",
             "| d | estimator | " + " | ".join(cfg.functions) + " |", "|---|---|" + "---|" * len(cfg.functions)]
    for r in rows:
        lines.append(f"| {r['d']} | {LABELS[r['sampler']]} | " + " | ".join(
            f"{r[f + '_gap_x_d']:.3f} +/- {2 * r[f + '_gap_x_d_se']:.3f}" for f in cfg.functions) + " |")
    lines += ["", f"Config: `{asdict(cfg)}`"]
    return "\n".join(lines)


PNG_GAP = register(Experiment(
    name="png_gap",
    title="Theorems 1-2: MSE(URN) - MSE(ORN / KRN) scales like 1/d for any f",
    configs={"quick": GapConfig(dims=(16, 64, 256), reps=150, pairs=16), "full": GapConfig()},
    run=run_png_gap,
    num_units=lambda c: len(c.dims) * len(c.samplers),
))


# ----------------------------------------------------------------------------------------------------------
# k ablation
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AblationConfig:
    """Configuration of the k ablation.

    Attributes:
        datasets: datasets (prepared as in Figure 2).
        ratios: values of k / (d ln d) for KRN.
        n_points: points per dataset; reps: repetitions; seed: base seed.
    """

    datasets: tuple[str, ...] = ("insurance", "cpu", "parkinson")
    ratios: tuple[float, ...] = (0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
    n_points: int = 200
    reps: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, {"datasets": ("names", _DATASETS), "ratios": ("reals", 0.0, None, True),
                            "n_points": ("int", 2), "reps": ("int", 1), "seed": ("int", 0)})


def ablation_mse(X: torch.Tensor, sampler: str, reps: int, seed: int, num_rotations: int | None = None) -> float:
    """Mean squared error of the angular kernel's ``m = d`` estimate over the off-diagonal pairs of ``X``, averaged
    over ``reps`` draws of ``sampler`` (KRN with ``num_rotations`` rotations when given)."""
    n, d = X.shape
    K = png_kernel(X, X, "angular")
    off = ~torch.eye(n, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    kw = {"num_rotations": num_rotations} if sampler == "kama" else {}
    total = 0.0
    for _ in range(reps):
        s = torch.sign(random_matrix(sampler, d, d, generator=gen, dtype=torch.float64, **kw).apply(X))
        total += float(((s @ s.T) / d - K)[off].pow(2).mean())
    return total / reps


def run_k_ablation(cfg: AblationConfig, ctx: RunContext) -> str:
    """KRN's error against ``k / (d ln d)`` into ``ctx.out_dir``; returns the report section (Markdown)."""
    rows = []
    for i, name in enumerate(cfg.datasets):
        X = subset(name, cfg.n_points, True, cfg.seed + i)
        d = X.shape[1]
        base = {s: ctx.unit(f"{name}_{s}", partial(ablation_mse, X, s, cfg.reps, cfg.seed + 11))
                for s in ("gaussian", "orthogonal")}
        for ratio in cfg.ratios:
            k = max(1, math.ceil(ratio * d * math.log(d)))
            mse = ctx.unit(f"{name}_kama_r{ratio:g}", partial(ablation_mse, X, "kama", cfg.reps, cfg.seed + 11, k))
            rows.append({"dataset": name, "d": d, "ratio": ratio, "k": k, "kama_mse": mse,
                         "orn_mse": base["orthogonal"], "urn_mse": base["gaussian"]})
    write_csv(ctx.out_dir / "k_ablation.csv", rows)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(cfg.datasets), figsize=(5.5 * len(cfg.datasets), 4.2), squeeze=False)
    for ax, name in zip(axes[0], cfg.datasets, strict=True):
        rs = [r for r in rows if r["dataset"] == name]
        ax.plot([r["ratio"] for r in rs], [r["kama_mse"] for r in rs], "o-", label="KAMA (KRN)")
        ax.axhline(rs[0]["orn_mse"], color="C3", ls="--", label="ORN")
        ax.axhline(rs[0]["urn_mse"], color="C0", ls=":", label="URN")
        ax.set(xscale="log", yscale="log", xlabel="k / (d ln d)", ylabel="pointwise MSE at m = d",
               title=f"{name} (d={rs[0]['d']}, N={cfg.n_points}, r={cfg.reps})")
        log_xticks(ax, cfg.ratios)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("KRN with k rotations: from the identity's error to ORN's")
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "k_ablation.png", dpi=110)
    plt.close(fig)
    lines = ["![k ablation](k_ablation/k_ablation.png)", "", "| dataset | d | k / (d ln d) | k | KRN MSE | ORN MSE | "
             "URN MSE |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['d']} | {r['ratio']:g} | {r['k']} | {r['kama_mse']:.5f} | {r['orn_mse']:.5f} | "
              f"{r['urn_mse']:.5f} |" for r in rows]
    lines += ["", f"Config: `{asdict(cfg)}`"]
    return "\n".join(lines)


K_ABLATION = register(Experiment(
    name="k_ablation",
    title="KRN accuracy against the number of rotations k",
    configs={"quick": AblationConfig(datasets=("insurance",), ratios=(0.02, 0.1, 0.5, 2.0), n_points=150, reps=60),
             "full": AblationConfig()},
    run=run_k_ablation,
    num_units=lambda c: len(c.datasets) * (2 + len(c.ratios)),
))


# ----------------------------------------------------------------------------------------------------------
# Speed
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeedConfig:
    """Configuration of the featurization-speed experiment.

    Attributes:
        dims: dimensions d (m = d features); n_points: points featurized; repeats: timings (median).
        threads: torch threads during the timing; seed: base seed.
    """

    dims: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    n_points: int = 10000
    repeats: int = 5
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, {"dims": ("ints", 2), "n_points": ("int", 1), "repeats": ("int", 1),
                            "threads": ("int", 1), "seed": ("int", 0)})


def _speed_row(sampler: str, d: int, cfg: SpeedConfig) -> dict[str, Any]:
    return {"d": d, "sampler": sampler, "seconds": featurize_seconds(sampler, d, cfg.n_points, cfg.repeats, cfg.seed)}


def featurize_seconds(sampler: str, d: int, n_points: int, repeats: int, seed: int) -> float:
    """Median wall time to sample an m = d matrix and compute sign(X W^T) for ``n_points`` points (float32)."""
    X = torch.randn(n_points, d, generator=torch.Generator().manual_seed(seed))
    times = []
    for r in range(repeats + 1):
        gen = torch.Generator().manual_seed(seed + r)
        t0 = time.perf_counter()
        with torch.no_grad():
            torch.sign(random_matrix(sampler, d, d, generator=gen, dtype=torch.float32).apply(X))
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def run_feature_speed(cfg: SpeedConfig, ctx: RunContext) -> str:
    """Featurization time of the samplers into ``ctx.out_dir``; returns the report section (Markdown)."""
    old = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        rows = [ctx.unit(f"d{d}_{s}", partial(_speed_row, s, d, cfg)) for d in cfg.dims for s in ORDER]
    finally:
        torch.set_num_threads(old)
    for r in rows:
        r["speedup_vs_urn"] = next(x["seconds"] for x in rows if x["d"] == r["d"] and x["sampler"] == "gaussian") \
            / r["seconds"]
    write_csv(ctx.out_dir / "feature_speed.csv", rows)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.3))
    for s in ORDER:
        rs = [r for r in rows if r["sampler"] == s]
        ax.plot([r["d"] for r in rs], [1e3 * r["seconds"] for r in rs], "o-", label=LABELS[s])
    ax.set(xscale="log", yscale="log", xlabel="d (m = d features)", ylabel="ms (sampling + featurization)",
           title=f"Featurization of N={cfg.n_points} points, {cfg.threads} thread(s)")
    log_xticks(ax, cfg.dims)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "feature_speed.png", dpi=110)
    plt.close(fig)
    lines = ["![speed](feature_speed/feature_speed.png)", "", "| d | " + " | ".join(LABELS[s] + " ms" for s in ORDER)
             + " | KAMA speed-up vs URN | vs ORN |", "|---|" + "---|" * (len(ORDER) + 2)]
    for d in cfg.dims:
        t = {r["sampler"]: r["seconds"] for r in rows if r["d"] == d}
        lines.append(f"| {d} | " + " | ".join(f"{1e3 * t[s]:.2f}" for s in ORDER)
                     + f" | {t['gaussian'] / t['kama']:.2f} | {t['orthogonal'] / t['kama']:.2f} |")
    lines += ["", f"Config: `{asdict(cfg)}`"]
    return "\n".join(lines)


FEATURE_SPEED = register(Experiment(
    name="feature_speed",
    title="Featurization speed of the four random matrices",
    configs={"quick": SpeedConfig(dims=(64, 256, 1024), n_points=2000, repeats=3), "full": SpeedConfig()},
    run=run_feature_speed,
    num_units=lambda c: len(c.dims) * len(ORDER),
))
