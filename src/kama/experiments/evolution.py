"""Evolution strategies for compact policies (paper section 1; Structured Evolution, ICML 2018): ARS with KAMA,
Toeplitz and unstructured policies, evaluation returns over time (mean +/- std over seeds)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .base import Experiment, RunContext, check_fields, register, write_csv
from .plotting import plot_curves
from .rl_policies import LABEL, read_returns


@dataclass(frozen=True)
class ESExperimentConfig:
    """Configuration of the ES experiment.

    Attributes:
        env_id: task; architectures: policies; seeds: seeds.
        es: further :class:`kama.rl.es.ESConfig` fields (hidden, num_rotations, total_timesteps, population, ...).
    """

    env_id: str = "Swimmer-v5"
    architectures: tuple[str, ...] = ("kama", "toeplitz", "mlp")
    seeds: tuple[int, ...] = (0, 1, 2)
    es: dict[str, Any] = field(default_factory=lambda: {"hidden": 16, "num_rotations": 50,
                                                        "total_timesteps": 1_000_000, "population": 16,
                                                        "eval_every": 25_000, "eval_episodes": 3})

    def __post_init__(self) -> None:
        from ..rl.es import ESConfig, validate_es
        from ..rl.policies import ARCHITECTURES

        check_fields(self, {"architectures": ("names", ARCHITECTURES), "seeds": ("ints", 0)})
        if not isinstance(self.es, dict):
            raise TypeError(f"es must be a mapping of ESConfig fields, got {self.es!r}")
        owned = sorted({"env_id", "architecture", "seed"} & set(self.es))
        unknown = sorted(set(self.es) - {f.name for f in fields(ESConfig)})
        if owned or unknown:
            raise ValueError(f"es cannot set {owned or unknown}: " + ("env_id, architectures and seeds are fields "
                             "of their own" if owned else "ESConfig has no such field(s)"))
        try:
            validate_es(ESConfig(env_id=self.env_id, architecture=self.architectures[0], **self.es),
                        check_environment=False)
        except (TypeError, ValueError) as e:
            raise type(e)(f"es: {e}") from None


def check_environment(cfg: ESExperimentConfig) -> None:
    """The task must be a gymnasium id with Box spaces (checked before any work; it creates one environment)."""
    from ..rl.policies import check_env

    if not isinstance(cfg.env_id, str):
        raise TypeError(f"env_id must be a gymnasium id (a str), got {cfg.env_id!r}")
    try:
        check_env(cfg.env_id)
    except ValueError as e:
        raise ValueError(f"env_id: {e}") from None


def run(cfg: ESExperimentConfig, ctx: RunContext) -> str:
    """Run the ES study into ``ctx.out_dir``; returns the report section (Markdown)."""
    from ..rl.es import ESConfig, train_es

    rows: list[dict] = []
    groups: dict[tuple, list] = {}
    params: dict[str, int] = {}
    for arch in cfg.architectures:
        for seed in cfg.seeds:
            folder = ctx.out_dir / "runs" / f"{cfg.env_id}__{arch}__s{seed}"

            def one(arch=arch, seed=seed, folder=folder) -> dict:
                out = train_es(ESConfig(env_id=cfg.env_id, architecture=arch, seed=seed, **cfg.es), folder)
                t, y = read_returns(Path(out))
                n = json.loads((Path(out) / "config.json").read_text())["parameters"]
                return {"t": t.tolist(), "y": y.tolist(), "parameters": n}

            res = ctx.unit(f"{arch}_s{seed}", one)
            groups.setdefault((cfg.env_id, "es", arch, 0, False), []).append((np.array(res["t"]), np.array(res["y"])))
            params[arch] = res["parameters"]
            rows += [{"architecture": arch, "seed": seed, "timesteps": t, "mean_return": y}
                     for t, y in zip(res["t"], res["y"], strict=True)]
    write_csv(ctx.out_dir / "es_returns.csv", rows)
    plot_curves(groups, ctx.out_dir / "es_curves.png", "ARS with compact policies (mean +/- std over seeds)",
                 lambda k: LABEL[k[2]])
    lines = ["![ES curves](es/es_curves.png)", "", "| architecture | policy parameters | final return (mean +/- std) |",
             "|---|---|---|"]
    for arch in cfg.architectures:
        finals = [g[1][-1] for g in groups[(cfg.env_id, "es", arch, 0, False)]]
        lines.append(f"| {LABEL[arch]} | {params[arch]} | {np.mean(finals):.1f} +/- {np.std(finals):.1f} |")
    steps = int(cfg.es.get("total_timesteps", ESConfig.total_timesteps))
    if len(cfg.seeds) < 3 or steps < 500_000:
        lines += ["", f"A small run ({len(cfg.seeds)} seed(s) x {steps} steps per policy): it shows that ES trains "
                  "every policy and what the curves look like; it cannot rank the policies, whose differences at "
                  "this budget are within seed-to-seed noise. The multi-seed evidence is in `results/evidence/`."]
    lines += ["", f"Config: `{asdict(cfg)}`"]
    return "\n".join(lines)


EXPERIMENT = register(Experiment(
    name="es",
    title="Evolution strategies (ARS) for compact policies",
    configs={"quick": ESExperimentConfig(env_id="InvertedPendulum-v5", seeds=(0, 1),
                                         es={"hidden": 8, "num_rotations": 20, "total_timesteps": 12_000,
                                             "population": 8, "eval_every": 3_000, "eval_episodes": 3}),
             "full": ESExperimentConfig()},
    run=run,
    num_units=lambda c: len(c.architectures) * len(c.seeds),
    check=check_environment,
))
