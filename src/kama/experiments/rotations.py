r"""Learning rotations on SO(d) (paper section 5): Theorem 3, convergence of the Givens rules against Riemannian
gradient descent with the matrix exponential and Adam on KAMA angles, and the adaptive capacity of k rotations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch

from ..manifold import RULES, Brockett, Procrustes, givens_coordinate_descent
from ..ops import givens_matrix, random_angles, random_pairs
from .base import Experiment, RunContext, check_fields, register, write_csv
from .capacity import haar_rotation
from .plotting import log_xticks, pyplot


def _problem(kind: str, d: int, seed: int) -> tuple[Any, float, Callable[[torch.Tensor], torch.Tensor]]:
    """(structured objective, optimal value, torch callable) of a test problem."""
    g = torch.Generator().manual_seed(seed)
    if kind == "brockett":
        a = torch.randn(d, d, generator=g, dtype=torch.float64)
        a = a + a.T
        n = torch.arange(1, d + 1, dtype=torch.float64)
        opt = float(torch.linalg.eigvalsh(a).flip(0) @ n)
        return Brockett(a, n), opt, lambda m: torch.trace(m.T @ a @ m * n)
    q = haar_rotation(d, g)
    if kind == "haar_fit":  # ||M - Q||_F^2
        eye = torch.eye(d, dtype=torch.float64)
        return Procrustes(eye, q), 0.0, lambda m: (m - q).pow(2).sum()
    a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    b = q @ a + 0.01 * torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(b @ a.T)
    best = u @ vh
    if torch.linalg.det(best) < 0:  # the best rotation (not reflection)
        u[:, -1] = -u[:, -1]
        best = u @ vh
    opt = float((best @ a - b).pow(2).sum())
    return Procrustes(a, b), opt, lambda m: (m @ a - b).pow(2).sum()


def riemannian_gd(f, d: int, steps: int, lr: float = 0.1) -> list[tuple[float, float]]:
    r"""Riemannian gradient descent with the matrix exponential and Armijo backtracking:
    :math:`M \leftarrow M \exp(\eta (Q^\top - Q))`, :math:`Q = M^\top \nabla F(M)`. Returns (seconds, F)."""
    m = torch.eye(d, dtype=torch.float64)
    out = []
    t0 = time.perf_counter()
    eta = lr
    for _ in range(steps):
        mm = m.clone().requires_grad_(True)
        val = f(mm)
        (grad,) = torch.autograd.grad(val, mm)
        q = m.T @ grad
        k = q.T - q
        slope = -0.5 * float(k.pow(2).sum())
        v0 = float(val.detach())
        eta = eta * 2
        while True:
            cand = m @ torch.linalg.matrix_exp(eta * k)
            with torch.no_grad():
                v = float(f(cand))
            if v <= v0 + 1e-4 * eta * slope or eta < 1e-12:
                break
            eta /= 2
        m = cand
        out.append((time.perf_counter() - t0, v))
    return out


def adam_angles(f, d: int, k: int, steps: int, lr: float, seed: int) -> list[tuple[float, float]]:
    """Adam on the angles of a KAMA matrix with k random planes. Returns (seconds, F) per iteration."""
    g = torch.Generator().manual_seed(seed)
    pairs = random_pairs(d, k, generator=g)
    angles = (random_angles(k, generator=g, dtype=torch.float64) * 0).requires_grad_(True)  # start at M = I
    opt = torch.optim.Adam([angles], lr=lr)
    out = []
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        val = f(givens_matrix(pairs, angles, d))
        val.backward()
        opt.step()
        out.append((time.perf_counter() - t0, float(val.detach())))
    return out


@dataclass(frozen=True)
class ManifoldConfig:
    """Configuration of the SO(d) experiment.

    Attributes:
        theorem_d: dimension of the Theorem 3 check; theorem_steps: its steps.
        problems: test problems (``brockett``, ``procrustes``, ``haar_fit``).
        d: dimension of the convergence study; steps: Givens steps per rule; rgd_steps / adam_steps: baselines.
        capacity_d: dimension of the adaptive-capacity study; capacity_ratios: k / (d ln d) values.
        seed: base seed.
    """

    theorem_d: int = 32
    theorem_steps: int = 1500
    problems: tuple[str, ...] = ("brockett", "procrustes", "haar_fit")
    d: int = 64
    steps: int = 6000
    rgd_steps: int = 400
    adam_steps: int = 1500
    capacity_d: int = 16
    capacity_ratios: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, {"theorem_d": ("int", 2), "theorem_steps": ("int", 1),
                            "problems": ("names", ("brockett", "procrustes", "haar_fit")), "d": ("int", 2),
                            "steps": ("int", 1), "rgd_steps": ("int", 1), "adam_steps": ("int", 1),
                            "capacity_d": ("int", 2), "capacity_ratios": ("reals", 0.0, None, True),
                            "seed": ("int", 0)})


def _theorem(cfg: ManifoldConfig) -> list[dict]:
    F, _, _ = _problem("brockett", cfg.theorem_d, cfg.seed)
    rows = []
    for rule in ("exact", "gradient"):
        res = givens_coordinate_descent(F, d=cfg.theorem_d, steps=cfg.theorem_steps, rule=rule)
        rows += [{"rule": rule, "step": h["step"], "decrease": h["decrease"], "bound": h["bound"], "B": h["B"],
                  "grad_norm_sq": h["grad_norm_sq"]} for h in res.history]
    return rows


def _convergence(cfg: ManifoldConfig, kind: str) -> list[dict]:
    F, opt, f = _problem(kind, cfg.d, cfg.seed)
    scale = max(abs(opt), 1.0)
    rows = []
    for rule in RULES:
        res = givens_coordinate_descent(F, d=cfg.d, steps=cfg.steps, rule=rule,
                                        generator=torch.Generator().manual_seed(cfg.seed))
        rows += [{"problem": kind, "method": f"givens-{rule}", "iteration": h["step"], "seconds": h["seconds"],
                  "rel_error": max((h["objective"] - opt) / scale, 0.0)} for h in res.history]
    rows += [{"problem": kind, "method": "riemannian-gd-expm", "iteration": i + 1, "seconds": s,
              "rel_error": max((v - opt) / scale, 0.0)} for i, (s, v) in enumerate(riemannian_gd(f, cfg.d,
                                                                                                  cfg.rgd_steps))]
    rows += [{"problem": kind, "method": "adam-kama-angles", "iteration": i + 1, "seconds": s,
              "rel_error": max((v - opt) / scale, 0.0)}
             for i, (s, v) in enumerate(adam_angles(f, cfg.d, cfg.steps, cfg.adam_steps, 0.01, cfg.seed))]
    return rows


def _capacity(cfg: ManifoldConfig) -> list[dict]:
    d = cfg.capacity_d
    F, _, f = _problem("haar_fit", d, cfg.seed + 1)
    rows = []
    for ratio in cfg.capacity_ratios:
        k = max(1, math.ceil(ratio * d * math.log(d)))
        res = givens_coordinate_descent(F, d=d, steps=k, rule="gradient")
        rows.append({"ratio": ratio, "k": k, "method": "givens-gradient (greedy planes)",
                     "rel_error": math.sqrt(max(res.history[-1]["objective"], 0.0) / d)})
        adam = adam_angles(f, d, k, cfg.adam_steps, 0.05, cfg.seed)
        rows.append({"ratio": ratio, "k": k, "method": "adam (random planes)",
                     "rel_error": math.sqrt(max(min(v for _, v in adam), 0.0) / d)})
    return rows


def run(cfg: ManifoldConfig, ctx: RunContext) -> str:
    """Theorem 3, convergence and capacity studies into ``ctx.out_dir``; returns the report section (Markdown)."""
    theorem = ctx.unit("theorem3", lambda: _theorem(cfg))
    conv = []
    for kind in cfg.problems:
        conv += ctx.unit(f"convergence_{kind}", partial(_convergence, cfg, kind))
    cap = ctx.unit("capacity", partial(_capacity, cfg))
    write_csv(ctx.out_dir / "theorem3.csv", theorem)
    write_csv(ctx.out_dir / "convergence.csv", conv)
    write_csv(ctx.out_dir / "adaptive_capacity.csv", cap)
    plt = pyplot()
    # Theorem 3
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, rule in zip(axes, ("exact", "gradient"), strict=True):
        rs = [r for r in theorem if r["rule"] == rule]
        ax.plot([r["step"] for r in rs], [r["decrease"] for r in rs], lw=1, label="measured decrease")
        ax.plot([r["step"] for r in rs], [r["bound"] for r in rs], lw=1, label="||grad F||^2 / (2 d (d-1) B)")
        ax.set(yscale="log", xlabel="step", ylabel="F(M_u) - F(M_u+1)",
               title=f"Theorem 3, Brockett d={cfg.theorem_d}, rule={rule}")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "theorem3.png", dpi=110)
    plt.close(fig)
    # Convergence
    fig, axes = plt.subplots(2, len(cfg.problems), figsize=(5.2 * len(cfg.problems), 8), squeeze=False)
    for c, kind in enumerate(cfg.problems):
        for method in sorted({r["method"] for r in conv if r["problem"] == kind}):
            rs = [r for r in conv if r["problem"] == kind and r["method"] == method]
            y = [max(r["rel_error"], 1e-16) for r in rs]
            axes[0, c].plot([r["iteration"] for r in rs], y, lw=1, label=method)
            axes[1, c].plot([r["seconds"] for r in rs], y, lw=1, label=method)
        axes[0, c].set(yscale="log", xscale="log", xlabel="iterations (Givens: rotations appended)",
                       ylabel="(F - F*) / |F*|", title=f"{kind}, d = {cfg.d}")
        axes[1, c].set(yscale="log", xscale="log", xlabel="wall-clock seconds", ylabel="(F - F*) / |F*|")
        for ax in axes[:, c]:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "convergence.png", dpi=110)
    plt.close(fig)
    # Adaptive capacity
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method in sorted({r["method"] for r in cap}):
        rs = [r for r in cap if r["method"] == method]
        ax.plot([r["ratio"] for r in rs], [max(r["rel_error"], 1e-16) for r in rs], "o-", label=method)
    ax.axvline((cfg.capacity_d - 1) / (2 * math.log(cfg.capacity_d)), color="k", ls="--", lw=1,
               label="k = dim SO(d)")
    ax.set(xscale="log", yscale="log", xlabel="k / (d ln d)", ylabel="||M - Q||_F / sqrt(d)",
           title=f"Fitting a Haar-random Q with k rotations (d = {cfg.capacity_d})")
    log_xticks(ax, cfg.capacity_ratios)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "adaptive_capacity.png", dpi=110)
    plt.close(fig)
    # Summary
    holds = {rule: all(r["decrease"] >= r["bound"] * (1 - 1e-9) - 1e-12 for r in theorem if r["rule"] == rule)
             for rule in ("exact", "gradient")}
    lines = ["![Theorem 3](manifold/theorem3.png)", "", f"Theorem 3 holds at every step: exact {holds['exact']}, "
             f"gradient {holds['gradient']} ({cfg.theorem_steps} steps each).", "",
             "![convergence](manifold/convergence.png)", "", "Time and iterations to a relative error of 1e-6:",
             "", "| problem | method | iterations | seconds | final rel. error |", "|---|---|---|---|---|"]
    for kind in cfg.problems:
        for method in sorted({r["method"] for r in conv if r["problem"] == kind}):
            rs = [r for r in conv if r["problem"] == kind and r["method"] == method]
            hit = next((r for r in rs if r["rel_error"] <= 1e-6), None)
            its = str(hit["iteration"]) if hit else "-"
            secs = f"{hit['seconds']:.3f}" if hit else "-"
            lines.append(f"| {kind} | {method} | {its} | {secs} | {rs[-1]['rel_error']:.2e} |")
    lines += ["", "![adaptive capacity](manifold/adaptive_capacity.png)", "",
              "| k / (d ln d) | k | method | rel. error |", "|---|---|---|---|"]
    lines += [f"| {r['ratio']:g} | {r['k']} | {r['method']} | {r['rel_error']:.2e} |" for r in cap]
    lines += ["", f"Config: `{asdict(cfg)}`"]
    return "\n".join(lines)


EXPERIMENT = register(Experiment(
    name="manifold",
    title="Learning rotations on SO(d): Givens coordinate descent (section 5, Algorithm 1, Theorem 3)",
    configs={"quick": ManifoldConfig(theorem_d=16, theorem_steps=300, d=24, steps=1200, rgd_steps=150,
                                     adam_steps=300, capacity_d=8, capacity_ratios=(0.5, 1.0, 2.0, 4.0)),
             "full": ManifoldConfig()},
    run=run,
    num_units=lambda c: 2 + len(c.problems),
))
