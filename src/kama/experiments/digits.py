r"""A supervised check of learned layers: an MLP classifier on scikit-learn's bundled handwritten digits
(8 x 8 images, 10 classes, 1797 samples; no download) with dense, KAMA and Toeplitz layers at stated parameter
counts, test accuracy against epochs.

Every network is ``64 -> h -> h -> 10`` with ReLU, trained by Adam on the cross-entropy of a fixed stratified
split (75 % train, 25 % test, features standardized on the training part). KAMA layers are shown with the
library's defaults and with the paper's parametrization (angle gain 1, i.i.d. planes), so the figure also
shows what the step-size and live-plane choices do outside reinforcement learning.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from .._optional import require
from ..nn import PAPER_SETTINGS, KamaLinear, ToeplitzLinear
from .base import Experiment, RunContext, check_fields, register, write_csv
from .plotting import pyplot

VARIANTS: dict[str, dict[str, Any]] = {
    "dense": {},
    "kama": {},
    "kama-paper": dict(PAPER_SETTINGS),
    "toeplitz": {},
}
"""Layer families of the experiment: ``kama`` uses :class:`kama.KamaLinear`'s defaults, ``kama-paper`` the paper's
parametrization."""

LABELS = {"dense": "dense (nn.Linear)", "kama": "KAMA", "kama-paper": "KAMA, paper's parametrization",
          "toeplitz": "Toeplitz"}


@dataclass(frozen=True)
class DigitsConfig:
    """Configuration of the digits experiment.

    Attributes:
        variants: layer families (keys of :data:`VARIANTS`).
        hidden: hidden units h of both hidden layers.
        num_rotations: K per KAMA layer (0: ``ceil(n ln n)`` for each layer).
        epochs: passes over the training set; batch_size: minibatch size; lr: Adam's learning rate.
        seeds: seeds of the initialization and the minibatch order (the split is fixed by ``split_seed``).
        split_seed: seed of the train / test split.
    """

    variants: tuple[str, ...] = ("dense", "kama", "kama-paper", "toeplitz")
    hidden: int = 64
    num_rotations: int = 0
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    split_seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, {"variants": ("names", tuple(VARIANTS)), "hidden": ("int", 2), "num_rotations": ("int", 0),
                            "epochs": ("int", 1), "batch_size": ("int", 1), "lr": ("real", 0.0, None, True),
                            "seeds": ("ints", 0), "split_seed": ("int", 0)})


QUICK = DigitsConfig(epochs=40, seeds=(0, 1))
FULL = DigitsConfig()


def load_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X_train, y_train, X_test, y_test)`` of the bundled digits: a stratified 75 / 25 split, features
    standardized with the training part's mean and standard deviation (float32)."""
    load_digits = require("sklearn.datasets", "reproduce", "the digits experiment").load_digits
    train_test_split = require("sklearn.model_selection", "reproduce", "the digits experiment").train_test_split

    data = load_digits()
    xtr, xte, ytr, yte = train_test_split(data.data, data.target, test_size=0.25, random_state=seed,
                                          stratify=data.target)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    t = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return t(xtr), torch.tensor(ytr), t(xte), torch.tensor(yte)


def make_layer(variant: str, in_features: int, out_features: int, num_rotations: int,
               generator: torch.Generator) -> nn.Module:
    """One layer of a family, initialized with ``generator`` (``nn.Linear``: its default init, seeded)."""
    if variant == "dense":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            return nn.Linear(in_features, out_features)
    if variant == "toeplitz":
        return ToeplitzLinear(in_features, out_features, generator=generator)
    k = num_rotations or None
    return KamaLinear(in_features, out_features, num_rotations=k, generator=generator, **VARIANTS[variant])


def make_network(variant: str, hidden: int, num_rotations: int, seed: int) -> nn.Sequential:
    """``64 -> h -> h -> 10`` with ReLU, every matrix of the family ``variant``."""
    g = torch.Generator().manual_seed(seed)
    return nn.Sequential(make_layer(variant, 64, hidden, num_rotations, g), nn.ReLU(),
                         make_layer(variant, hidden, hidden, num_rotations, g), nn.ReLU(),
                         make_layer(variant, hidden, 10, num_rotations, g))


def parameter_count(net: nn.Module) -> int:
    """Learned parameters (KAMA: angles + scalars + biases; the planes are fixed buffers)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def train_one(cfg: DigitsConfig, variant: str, seed: int) -> dict[str, Any]:
    """Train one network; test accuracy after every epoch, the parameter count and the final training loss."""
    xtr, ytr, xte, yte = load_split(cfg.split_seed)
    net = make_network(variant, cfg.hidden, cfg.num_rotations, seed)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    order = torch.Generator().manual_seed(10_000 + seed)
    acc, loss_value = [], math.nan
    for _ in range(cfg.epochs):
        net.train()
        perm = torch.randperm(xtr.shape[0], generator=order)
        for start in range(0, xtr.shape[0], cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            loss = nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_value = float(loss.detach())
        net.eval()
        with torch.no_grad():
            acc.append(float((net(xte).argmax(1) == yte).float().mean()))
    return {"variant": variant, "seed": seed, "test_accuracy": acc, "parameters": parameter_count(net),
            "final_train_loss": loss_value}


def run(cfg: DigitsConfig, ctx: RunContext) -> str:
    """Train every variant and seed into ``ctx.out_dir``; returns the report section (Markdown)."""
    torch.set_num_threads(1)
    res = {(v, s): ctx.unit(f"{v}_s{s}", partial(train_one, cfg, v, s))
           for v in cfg.variants for s in cfg.seeds}
    rows = [{"variant": v, "seed": s, "epoch": e + 1, "test_accuracy": a}
            for (v, s), r in res.items() for e, a in enumerate(r["test_accuracy"])]
    write_csv(ctx.out_dir / "digits_accuracy.csv", rows)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    epochs = np.arange(1, cfg.epochs + 1)
    summary = []
    dense_params = None
    for v in cfg.variants:
        curves = np.array([res[(v, s)]["test_accuracy"] for s in cfg.seeds]) * 100
        mean, std = curves.mean(0), curves.std(0)
        params = res[(v, cfg.seeds[0])]["parameters"]
        if v == "dense":
            dense_params = params
        line = ax.plot(epochs, mean, label=f"{LABELS[v]} ({params} parameters)")[0]
        ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        finals = curves[:, -1]
        summary.append((v, params, float(finals.mean()), float(finals.std()), float(curves.max(1).mean())))
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(80, 100),
           title=f"Digits, 64 -> {cfg.hidden} -> {cfg.hidden} -> 10 (mean +/- std over {len(cfg.seeds)} seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "digits.png", dpi=110)
    plt.close(fig)
    lines = ["![digits](digits/digits.png)", "",
             "| layers | parameters | vs dense | final test accuracy (%) | best epoch's (%) |", "|---|---|---|---|---|"]
    for v, params, mean, std, best in summary:
        ratio = f"{100 * params / dense_params:.1f} %" if dense_params else "-"
        lines.append(f"| {LABELS[v]} | {params} | {ratio} | {mean:.2f} +/- {std:.2f} | {best:.2f} |")
    lines += ["", f"Config: `{asdict(cfg)}`"]
    return "\n".join(lines)


EXPERIMENT = register(Experiment(
    name="digits",
    title="A supervised check: a digits classifier with dense, KAMA and Toeplitz layers",
    configs={"quick": QUICK, "full": FULL},
    run=run,
    num_units=lambda c: len(c.variants) * len(c.seeds),
))
