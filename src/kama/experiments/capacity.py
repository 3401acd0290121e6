r"""Capacity of products of k Givens rotations (paper section 3).

*Non-adaptive*: how fast Kac's walk ``G_1 ... G_k e_1`` (i.i.d. uniform pairs, uniform angles) approaches a
Haar-random unit vector as ``k`` grows. Two statistics against the exact Haar law of the first column of a
random rotation:

* the Kolmogorov-Smirnov distance of the first entry ``u_1``, whose Haar law is exact:
  :math:`(u_1 + 1)/2 \sim \mathrm{Beta}((d-1)/2, (d-1)/2)`; the expected KS distance of an exact Haar sample
  of the same size, sqrt(pi / 2) ln 2 / sqrt(n), is drawn as the noise floor;
* the fourth moment :math:`\sum_i u_i^4`, whose Haar mean is :math:`3/(d+2)` (the walk starts at 1); we
  report the ratio ``E[sum u^4] (d + 2) / 3``, which tends to 1.

*Adaptive*: fitting a Haar-random target rotation ``Q`` by ``k`` learned angles on random planes (Adam on
:math:`\lVert M(\theta) - Q \rVert_F^2`), relative error :math:`\lVert M - Q\rVert_F / \sqrt d` against
``k / (d ln d)``; a generic rotation needs at least ``d (d - 1) / 2`` rotations (the dimension of SO(d)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from scipy import stats

from ..ops import blocked_pairs, givens_matrix, random_angles, random_pairs
from .base import Experiment, RunContext, check_fields, register, write_csv
from .plotting import log_xticks, pyplot


@dataclass(frozen=True)
class CapacityConfig:
    """Configuration of the capacity experiment.

    Attributes:
        dims: dimensions ``d`` of the mixing study.
        ratios: values of ``k / (d ln d)`` at which the walk is measured.
        walks: independent walks per ``d`` (sample size of the statistics).
        fit_dims: dimensions of the adaptive (fitting) study.
        fit_ratios: ``k / (d ln d)`` values of the fitting study.
        fit_steps: Adam steps per fit; fit_lr: Adam learning rate.
        seed: base seed of every random draw.
        families: plan families of the mixing study: ``"kac"`` (the paper's i.i.d. pairs) and / or
            ``"blocked"`` (:func:`kama.ops.blocked_pairs`, ``d >= 8``).
    """

    dims: tuple[int, ...] = (16, 64, 256)
    ratios: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    walks: int = 4000
    fit_dims: tuple[int, ...] = (16, 32)
    fit_ratios: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    fit_steps: int = 1500
    fit_lr: float = 0.05
    seed: int = 0
    families: tuple[str, ...] = ("kac",)

    def __post_init__(self) -> None:
        check_fields(self, {"dims": ("ints", 2), "ratios": ("reals", 0.0, None, True), "walks": ("int", 2),
                            "fit_dims": ("ints", 2), "fit_ratios": ("reals", 0.0, None, True),
                            "fit_steps": ("int", 1), "fit_lr": ("real", 0.0, None, True), "seed": ("int", 0),
                            "families": ("names", ("kac", "blocked"))})
        if "blocked" in self.families and min(self.dims) < 8:
            raise ValueError(f"dims must all be >= 8 for the blocked family, got {list(self.dims)}")


QUICK = CapacityConfig(dims=(16, 64), ratios=(0.25, 0.5, 1.0, 2.0, 4.0), walks=1000, fit_dims=(8,),
                       fit_ratios=(0.5, 1.0, 2.0, 4.0), fit_steps=300)
FULL = CapacityConfig()


def _k(ratio: float, d: int) -> int:
    return max(1, int(math.ceil(ratio * d * math.log(d))))


def _blocked_walks(d: int, k: int, walks: int, g: torch.Generator) -> torch.Tensor:
    """``(k, walks, 2)`` pairs of ``walks`` independent blocked plans (:func:`kama.ops.blocked_pairs`), in
    application order (a prefix of a blocked plan's application order is a blocked plan)."""
    return torch.stack([blocked_pairs(d, k, generator=g).flip(0) for _ in range(walks)], dim=1)


def mixing_statistics(d: int, ratios: tuple[float, ...], walks: int, seed: int,
                      family: str = "kac") -> list[dict[str, Any]]:
    """Run ``walks`` independent walks from ``e_1`` in parallel and measure them at each ``k``: Kac's (i.i.d.
    pairs) or, with ``family="blocked"``, register-blocked plans (groups of 12 butterfly rotations on 8
    coordinates); angles uniform either way."""
    g = torch.Generator().manual_seed(seed)
    checkpoints = sorted({_k(r, d): r for r in ratios}.items())
    blocked = _blocked_walks(d, checkpoints[-1][0], walks, g) if family == "blocked" else None
    v = torch.zeros(walks, d, dtype=torch.float64)
    v[:, 0] = 1.0
    rows = torch.arange(walks)
    beta = stats.beta((d - 1) / 2, (d - 1) / 2)
    floor = math.sqrt(math.pi / 2) * math.log(2) / math.sqrt(walks)  # E[KS] of an exact sample (Kolmogorov)
    out = []
    step = 0
    for k, ratio in checkpoints:
        n = k - step
        pairs = random_pairs(d, n * walks, generator=g).view(n, walks, 2) if blocked is None else blocked[step:k]
        angles = random_angles(n * walks, generator=g, dtype=torch.float64).view(n, walks)
        cos, sin = torch.cos(angles), torch.sin(angles)
        for r in range(n):
            i, j = pairs[r, :, 0], pairs[r, :, 1]
            vi, vj = v[rows, i], v[rows, j]
            v[rows, i] = cos[r] * vi - sin[r] * vj
            v[rows, j] = sin[r] * vi + cos[r] * vj
        step = k
        u1 = v[:, 0].numpy()
        ks = float(stats.kstest(u1, lambda u: beta.cdf((u + 1) / 2)).statistic)
        m4 = float((v**4).sum(dim=1).mean()) * (d + 2) / 3
        out.append({"d": d, "ratio": ratio, "k": k, "ks": ks, "ks_haar_floor": floor, "m4_ratio": m4,
                    "walks": walks, "family": family})
    return out


def haar_rotation(d: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random element of SO(d): QR of a Gaussian with the sign fix, then det fixed to +1."""
    a = torch.randn(d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))[None, :]
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def fit_error(d: int, ratio: float, steps: int, lr: float, seed: int) -> dict[str, float]:
    """Fit a Haar-random target with ``k = ratio d ln d`` learned angles on random planes."""
    g = torch.Generator().manual_seed(seed)
    target = haar_rotation(d, g)
    k = _k(ratio, d)
    pairs = random_pairs(d, k, generator=g)
    angles = random_angles(k, generator=g, dtype=torch.float64).requires_grad_(True)
    opt = torch.optim.Adam([angles], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    best = math.inf
    for _ in range(steps):
        opt.zero_grad()
        loss = (givens_matrix(pairs, angles, d) - target).pow(2).sum()
        loss.backward()
        opt.step()
        sched.step()
        best = min(best, loss.item())
    with torch.no_grad():
        final = float((givens_matrix(pairs, angles, d) - target).pow(2).sum())
    best = min(best, final)
    return {"d": d, "ratio": ratio, "k": k, "rel_error": math.sqrt(best / d),
            "so_d_dim_ratio": d * (d - 1) / 2 / (d * math.log(d)), "steps": steps}


def _plot(mix: list[dict], fit: list[dict], path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    dims = sorted({r["d"] for r in mix})
    families = sorted({r.get("family", "kac") for r in mix}, key=lambda f: f != "kac")
    for i, d in enumerate(dims):
        for family in families:
            rs = [r for r in mix if r["d"] == d and r.get("family", "kac") == family]
            x = [r["ratio"] for r in rs]
            style = "o-" if family == "kac" else "s--"
            label = f"d = {d}" + ("" if len(families) == 1 else f", {family}")
            axes[0].plot(x, [r["ks"] for r in rs], style, color=f"C{i}", label=label)
            axes[1].plot(x, [abs(r["m4_ratio"] - 1) for r in rs], style, color=f"C{i}", label=label)
        axes[0].axhline(rs[0]["ks_haar_floor"], color=f"C{i}", ls=":", lw=1)
    axes[0].set(xscale="log", yscale="log", xlabel="k / (d ln d)", ylabel="KS distance of u_1 vs Haar",
                title="Kac's walk vs Haar: first entry of M e_1\n(dotted: expected KS of an exact Haar sample)")
    axes[1].set(xscale="log", yscale="log", xlabel="k / (d ln d)", ylabel="|E[sum u_i^4] (d+2)/3 - 1|",
                title="Fourth moment of M e_1 (Haar value: 0)")
    for d in sorted({r["d"] for r in fit}):
        rs = [r for r in fit if r["d"] == d]
        line = axes[2].plot([r["ratio"] for r in rs], [r["rel_error"] for r in rs], "o-", label=f"d = {d}")[0]
        axes[2].axvline(rs[0]["so_d_dim_ratio"], color=line.get_color(), ls="--", lw=1)
    axes[2].set(xscale="log", yscale="log", xlabel="k / (d ln d)", ylabel="||M - Q||_F / sqrt(d)",
                title="Fitting a Haar-random Q with k learned angles\n(dashed: k = dim SO(d) = d(d-1)/2)")
    for ax, xs in zip(axes, ([r["ratio"] for r in mix], [r["ratio"] for r in mix], [r["ratio"] for r in fit]),
                      strict=True):
        log_xticks(ax, xs)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: CapacityConfig, ctx: RunContext) -> str:
    """Run the mixing and fitting studies into ``ctx.out_dir``; returns the report section (Markdown)."""
    mix: list[dict] = []
    for family in cfg.families:
        for d in cfg.dims:
            key = f"mixing_d{d}" if family == "kac" else f"mixing_{family}_d{d}"
            mix += ctx.unit(key, partial(mixing_statistics, d, cfg.ratios, cfg.walks, cfg.seed + d, family))
    fit: list[dict] = []
    for d in cfg.fit_dims:
        for ratio in cfg.fit_ratios:
            fit.append(ctx.unit(f"fit_d{d}_r{ratio:g}",
                                partial(fit_error, d, ratio, cfg.fit_steps, cfg.fit_lr,
                                        cfg.seed + 1000 * d + int(100 * ratio))))
    write_csv(ctx.out_dir / "capacity_mixing.csv", mix)
    write_csv(ctx.out_dir / "capacity_fit.csv", fit)
    _plot(mix, fit, ctx.out_dir / "capacity.png")
    lines = ["![capacity](capacity/capacity.png)", "",
             "Mixing of Kac's walk (first column of M) against the exact Haar law:", "",
             "| plans | d | k / (d ln d) | k | KS(u_1) | E[KS] of a Haar sample | E[sum u^4] (d+2)/3 |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.get('family', 'kac')} | {r['d']} | {r['ratio']:g} | {r['k']} | {r['ks']:.4f} | "
              f"{r['ks_haar_floor']:.4f} | {r['m4_ratio']:.3f} |" for r in mix]
    lines += ["", "Fitting a Haar-random rotation with k learned angles (random planes):", "",
              "| d | k / (d ln d) | k | rel. error | dim SO(d) / (d ln d) |", "|---|---|---|---|---|"]
    lines += [f"| {r['d']} | {r['ratio']:g} | {r['k']} | {r['rel_error']:.4f} | {r['so_d_dim_ratio']:.2f} |"
              for r in fit]
    lines += ["", f"Config: `{asdict(cfg)}`"]
    return "\n".join(lines)


EXPERIMENT = register(
    Experiment(
        name="capacity",
        title="Capacity of products of k Givens rotations (section 3)",
        configs={"quick": QUICK, "full": FULL},
        run=run,
        num_units=lambda c: len(c.families) * len(c.dims) + len(c.fit_dims) * len(c.fit_ratios),
    )
)
