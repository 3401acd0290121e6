"""One reinforcement-learning run: a documented config, validation before training, evaluation returns over
time (CSV), the config with seed and git commit beside them, and the trained model."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback

from .._checks import check_choice, check_int
from ..experiments.base import atomic_write_text, provenance, write_csv
from .policies import ARCHITECTURES, KamaActorCriticPolicy, actor_parameter_count, check_env

__all__ = ["RunConfig", "ALGORITHMS", "validate", "make_model", "evaluate", "train"]

ALGORITHMS: tuple[str, ...] = ("ppo", "trpo")


@dataclass(frozen=True)
class RunConfig:
    """One training run.

    Attributes:
        env_id: a gymnasium environment id with Box observations and actions (MuJoCo v5 tasks).
        algo: ``"ppo"`` (stable-baselines3) or ``"trpo"`` (sb3-contrib).
        architecture: ``"kama"``, ``"toeplitz"`` or ``"mlp"``.
        hidden: hidden units h (paper: 64 for PPO, 32 for TRPO).
        num_rotations: K, Givens rotations per KAMA layer (paper: 200 for PPO, 100 for TRPO).
        structured_critic: structure the critic as the actor (default: a dense critic; the paper compresses
            and counts the actor, and a structured critic measurably slows learning on Hopper, see README).
        learn_planes: learn the rotation planes (section 6.3).
        total_timesteps: environment steps.
        eval_every: steps between evaluations (also one at step 0 and one at the end).
        eval_episodes: episodes per evaluation (deterministic actions, a separate seeded environment).
        seed: seed of the algorithm, the policy's initialization and the environments.
        algo_kwargs: extra keyword arguments of PPO / TRPO (e.g. ``{"n_steps": 1024}``).
    """

    env_id: str = "InvertedPendulum-v5"
    algo: str = "ppo"
    architecture: str = "kama"
    hidden: int = 64
    num_rotations: int = 200
    structured_critic: bool = False
    learn_planes: bool = False
    total_timesteps: int = 100_000
    eval_every: int = 10_000
    eval_episodes: int = 5
    seed: int = 0
    algo_kwargs: dict[str, Any] = field(default_factory=dict)


def validate(cfg: RunConfig) -> None:
    """Typed errors for a bad config, raised before any environment step."""
    check_choice("algo", cfg.algo, ALGORITHMS)
    check_choice("architecture", cfg.architecture, ARCHITECTURES)
    check_int("hidden", cfg.hidden, minimum=1)
    check_int("num_rotations", cfg.num_rotations, minimum=1)
    check_int("total_timesteps", cfg.total_timesteps, minimum=1)
    check_int("eval_every", cfg.eval_every, minimum=1)
    check_int("eval_episodes", cfg.eval_episodes, minimum=1)
    check_int("seed", cfg.seed, minimum=0)
    if not isinstance(cfg.algo_kwargs, dict):
        raise TypeError(f"algo_kwargs must be a dict, got {type(cfg.algo_kwargs).__name__}")
    check_env(cfg.env_id)


def make_model(cfg: RunConfig, env: gym.Env | str | None = None) -> Any:
    """The PPO or TRPO model of ``cfg`` (``validate`` first)."""
    validate(cfg)
    policy_kwargs = {"architecture": cfg.architecture, "hidden": cfg.hidden, "num_rotations": cfg.num_rotations,
                     "structured_critic": cfg.structured_critic, "learn_planes": cfg.learn_planes}
    if cfg.algo == "ppo":
        algo_cls: Any = PPO
    else:
        from sb3_contrib import TRPO

        algo_cls = TRPO
    return algo_cls(KamaActorCriticPolicy, env if env is not None else cfg.env_id, policy_kwargs=policy_kwargs,
                    seed=cfg.seed, device="cpu", **cfg.algo_kwargs)


def evaluate(model: Any, env_id: str, episodes: int, seed: int) -> list[float]:
    """Returns of ``episodes`` deterministic episodes on a fresh environment seeded with ``seed``."""
    env = gym.make(env_id)
    returns = []
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            done, total = False, 0.0
            while not done:
                action, _ = model.predict(obs, deterministic=True)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return returns


class _EvalCallback(BaseCallback):
    def __init__(self, cfg: RunConfig, rows: list[dict], csv_path: Path, t0: float) -> None:
        super().__init__()
        self.cfg, self.rows, self.csv_path, self.t0 = cfg, rows, csv_path, t0
        self.next_eval = cfg.eval_every

    def record(self) -> None:
        rets = evaluate(self.model, self.cfg.env_id, self.cfg.eval_episodes, 10_000 + self.cfg.seed)
        self.rows.append({"timesteps": int(self.model.num_timesteps), "mean_return": float(np.mean(rets)),
                          "std_return": float(np.std(rets)), "episodes": len(rets),
                          "wall_seconds": time.perf_counter() - self.t0})
        write_csv(self.csv_path, self.rows)

    def _on_step(self) -> bool:
        if self.model.num_timesteps >= self.next_eval:
            self.record()
            self.next_eval += self.cfg.eval_every
        return True


def train(cfg: RunConfig, out_dir: str | Path) -> Path:
    """Train one run and write ``returns.csv``, ``config.json`` and ``model.zip`` under ``out_dir``.

    ``returns.csv`` holds ``timesteps, mean_return, std_return, episodes, wall_seconds``; ``config.json`` the
    resolved config, the actor's parameter count, provenance (package version, git commit) and, once the run
    finished, ``"finished": true``. Returns ``out_dir``.
    """
    validate(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = make_model(cfg)
    meta = {"config": dataclasses.asdict(cfg), "actor_parameters": actor_parameter_count(model.policy),
            "finished": False, **provenance()}
    atomic_write_text(out / "config.json", json.dumps(meta, indent=2))
    rows: list[dict] = []
    t0 = time.perf_counter()
    callback = _EvalCallback(cfg, rows, out / "returns.csv", t0)
    callback.init_callback(model)
    callback.record()  # the untrained policy, at step 0
    model.learn(total_timesteps=cfg.total_timesteps, callback=callback)
    if not rows or rows[-1]["timesteps"] != model.num_timesteps:
        callback.record()
    model.save(out / "model.zip")
    meta.update(finished=True, seconds=time.perf_counter() - t0, steps_per_second=cfg.total_timesteps / (
        time.perf_counter() - t0))
    atomic_write_text(out / "config.json", json.dumps(meta, indent=2))
    return out
