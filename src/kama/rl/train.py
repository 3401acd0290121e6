"""One reinforcement-learning run: a documented config, validation before training, evaluation returns over
time (CSV), the config with seed and git commit beside them, and the trained model."""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from .._checks import check_bool, check_choice, check_int, check_real
from ..nn import DEFAULT_ANGLE_GAIN, DEFAULT_PLANE_SAMPLER, PAPER_SETTINGS, PLANE_SAMPLERS, check_angle_gain
from ..records import atomic_write_text, file_manifest, provenance, write_csv
from .policies import ARCHITECTURES, KamaActorCriticPolicy, actor_parameter_count, check_env

__all__ = ["RunConfig", "ALGORITHMS", "validate", "make_env", "make_model", "evaluate", "load_run", "train",
           "stored_config", "LEGACY_VALUES"]

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
        angle_gain: KAMA layers' angle gain (:class:`kama.KamaLinear`): ``"dense"`` (a dense layer's step size)
            or a float (1.0: the paper's parametrization).
        plane_sampler: KAMA layers' planes: ``"live"`` (no dead rotation, the default) or ``"iid"`` (the
            paper's).
        normalize: wrap the training environment in ``VecNormalize`` (running normalization of observations and
            rewards, as OpenAI baselines' MuJoCo runs that the paper used; the default); evaluation normalizes
            observations with the training statistics and reports raw returns. Applied alike to every
            architecture.
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
    angle_gain: float | str = DEFAULT_ANGLE_GAIN
    plane_sampler: str = DEFAULT_PLANE_SAMPLER
    normalize: bool = True
    total_timesteps: int = 100_000
    eval_every: int = 10_000
    eval_episodes: int = 5
    seed: int = 0
    algo_kwargs: dict[str, Any] = field(default_factory=dict)


LEGACY_VALUES: dict[str, Any] = {**PAPER_SETTINGS, "normalize": False}
"""Fields added to :class:`RunConfig` after runs were stored, with the value that reproduces a run made before the
field existed (used when a stored ``config.json`` is compared with a config)."""


def stored_config(stored: object) -> dict[str, Any]:
    """A stored run config (``config.json``'s ``"config"``) completed with :data:`LEGACY_VALUES` for missing fields."""
    if not isinstance(stored, dict):
        return {}
    return {**LEGACY_VALUES, **stored}


# Keyword arguments of PPO / TRPO whose value the run config owns, and numeric ones checked before training:
# (kind, lower bound, lower bound excluded, upper bound).
_OWNED = ("policy", "env", "seed", "device", "policy_kwargs", "_init_setup_model")
_NUMERIC: dict[str, tuple[type, float, bool, float | None]] = {
    "n_steps": (int, 2, False, None), "batch_size": (int, 2, False, None), "n_epochs": (int, 1, False, None),
    "n_critic_updates": (int, 1, False, None), "cg_max_steps": (int, 1, False, None),
    "line_search_max_iter": (int, 1, False, None), "learning_rate": (float, 0.0, True, None),
    "gamma": (float, 0.0, True, 1.0), "gae_lambda": (float, 0.0, False, 1.0), "clip_range": (float, 0.0, True, None),
    "ent_coef": (float, 0.0, False, None), "vf_coef": (float, 0.0, False, None),
    "max_grad_norm": (float, 0.0, True, None), "target_kl": (float, 0.0, True, None),
    "cg_damping": (float, 0.0, False, None), "line_search_shrinking_factor": (float, 0.0, True, 1.0),
}


def _algo_class(algo: str) -> Any:
    if algo == "ppo":
        return PPO
    from sb3_contrib import TRPO

    return TRPO


def _check_algo_kwargs(algo: str, kwargs: object) -> None:
    if not isinstance(kwargs, dict):
        raise TypeError(f"algo_kwargs must be a dict of {algo.upper()} keyword arguments, got "
                        f"{type(kwargs).__name__} ({kwargs!r})")
    cls = _algo_class(algo)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    for key, value in kwargs.items():
        if key in _OWNED:
            raise ValueError(f"algo_kwargs cannot set {key!r}: the run config owns it")
        if key not in accepted:
            raise ValueError(f"algo_kwargs: {cls.__name__} takes no argument {key!r}; it takes {sorted(accepted)}")
        if key in _NUMERIC and not (key == "target_kl" and value is None):
            kind, low, strict, high = _NUMERIC[key]
            name = f"algo_kwargs[{key!r}]"
            if kind is int:
                check_int(name, value, minimum=int(low))
            else:
                check_real(name, value, minimum=low, strict_minimum=strict, maximum=high)


def validate(cfg: RunConfig) -> None:
    """Typed errors naming the field for a bad config, raised before any environment step."""
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"cfg must be a RunConfig, got {type(cfg).__name__}")
    check_choice("algo", cfg.algo, ALGORITHMS)
    check_choice("architecture", cfg.architecture, ARCHITECTURES)
    check_int("hidden", cfg.hidden, minimum=1)
    check_int("num_rotations", cfg.num_rotations, minimum=1)
    check_bool("structured_critic", cfg.structured_critic)
    check_bool("learn_planes", cfg.learn_planes)
    check_angle_gain(cfg.angle_gain)
    check_choice("plane_sampler", cfg.plane_sampler, PLANE_SAMPLERS)
    check_bool("normalize", cfg.normalize)
    check_int("total_timesteps", cfg.total_timesteps, minimum=1)
    check_int("eval_every", cfg.eval_every, minimum=1)
    check_int("eval_episodes", cfg.eval_episodes, minimum=1)
    check_int("seed", cfg.seed, minimum=0)
    _check_algo_kwargs(cfg.algo, cfg.algo_kwargs)
    if not isinstance(cfg.env_id, str):
        raise TypeError(f"env_id must be a gymnasium id (a str), got {type(cfg.env_id).__name__} ({cfg.env_id!r})")
    check_env(cfg.env_id)


def make_env(cfg: RunConfig) -> Any:
    """The training environment of ``cfg``: its id (SB3 wraps it in ``Monitor`` and ``DummyVecEnv``), or, with
    ``normalize``, the same wrapped in ``VecNormalize`` (observations and rewards; the algorithm's ``gamma``)."""
    if not cfg.normalize:
        return cfg.env_id
    venv = DummyVecEnv([lambda: Monitor(gym.make(cfg.env_id))])
    return VecNormalize(venv, norm_obs=True, norm_reward=True, gamma=float(cfg.algo_kwargs.get("gamma", 0.99)))


def make_model(cfg: RunConfig, env: gym.Env | str | None = None) -> Any:
    """The PPO or TRPO model of ``cfg`` (``validate`` first), on ``env`` (default: :func:`make_env`)."""
    validate(cfg)
    policy_kwargs = {"architecture": cfg.architecture, "hidden": cfg.hidden, "num_rotations": cfg.num_rotations,
                     "structured_critic": cfg.structured_critic, "learn_planes": cfg.learn_planes,
                     "angle_gain": cfg.angle_gain, "plane_sampler": cfg.plane_sampler}
    algo_cls = _algo_class(cfg.algo)
    try:
        return algo_cls(KamaActorCriticPolicy, env if env is not None else make_env(cfg), policy_kwargs=policy_kwargs,
                        seed=cfg.seed, device="cpu", **cfg.algo_kwargs)
    except AssertionError as e:  # SB3 checks some argument combinations with assert
        raise ValueError(f"algo_kwargs {cfg.algo_kwargs} rejected by {algo_cls.__name__}: {e}") from None


def evaluate(model: Any, env_id: str, episodes: int, seed: int, normalizer: VecNormalize | None = None) -> list[float]:
    """Returns of ``episodes`` deterministic episodes on a fresh environment seeded with ``seed``.

    With ``normalizer`` (the training ``VecNormalize``), observations are normalized by its current statistics
    (not updated) before the policy sees them; returns are always the environment's raw rewards."""
    env = gym.make(env_id)
    returns = []
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            done, total = False, 0.0
            while not done:
                seen = normalizer.normalize_obs(obs) if normalizer is not None else obs
                action, _ = model.predict(seen, deterministic=True)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return returns


def load_run(folder: str | Path) -> tuple[Any, VecNormalize | None]:
    """The trained model of a run folder and its observation normalizer (``None`` without ``normalize``), ready
    for :func:`evaluate`: ``evaluate(model, env_id, episodes, seed, normalizer)``."""
    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text())
    algo_cls = _algo_class(meta["config"]["algo"])
    model = algo_cls.load(folder / "model.zip", device="cpu")
    normalizer = None
    if (folder / "vecnormalize.pkl").exists():
        venv = DummyVecEnv([lambda: gym.make(meta["config"]["env_id"])])
        normalizer = VecNormalize.load(str(folder / "vecnormalize.pkl"), venv)
        normalizer.training = False
        normalizer.norm_reward = False
    return model, normalizer


class _EvalCallback(BaseCallback):
    """Evaluations every ``eval_every`` steps (``returns.csv``) and the statistics of every policy update that
    the algorithm logs (``updates.csv``: ``approx_kl``, ``clip_fraction``, ``explained_variance``, ...)."""

    def __init__(self, cfg: RunConfig, rows: list[dict], csv_path: Path, t0: float,
                 updates_path: Path | None = None) -> None:
        super().__init__()
        self.cfg, self.rows, self.csv_path, self.t0 = cfg, rows, csv_path, t0
        self.next_eval = cfg.eval_every
        self.updates_path = updates_path
        self.updates: list[dict] = []
        self._last_update: object = None

    def record(self) -> None:
        norm = self.model.get_vec_normalize_env()
        rets = evaluate(self.model, self.cfg.env_id, self.cfg.eval_episodes, 10_000 + self.cfg.seed, norm)
        self.rows.append({"timesteps": int(self.model.num_timesteps), "mean_return": float(np.mean(rets)),
                          "std_return": float(np.std(rets)), "episodes": len(rets),
                          "wall_seconds": time.perf_counter() - self.t0})
        write_csv(self.csv_path, self.rows)

    def record_update(self) -> None:
        """The last update's logged ``train/*`` values (SB3 records them in ``train()`` and dumps them after the
        next rollout, so they are readable when a rollout starts and once learning ends)."""
        values = {k.split("/", 1)[1]: v for k, v in self.model.logger.name_to_value.items() if k.startswith("train/")}
        if not values or self.updates_path is None:
            return
        key = values.get("n_updates", len(self.updates))
        if key == self._last_update:
            return
        self._last_update = key
        cols = list(self.updates[0]) if self.updates else ["timesteps", *sorted(values)]
        row = {"timesteps": int(self.model.num_timesteps), **values}
        self.updates.append({c: float(row[c]) if c in row and row[c] is not None else None for c in cols})
        write_csv(self.updates_path, self.updates)

    def _on_rollout_start(self) -> None:
        self.record_update()

    def _on_step(self) -> bool:
        if self.model.num_timesteps >= self.next_eval:
            self.record()
            self.next_eval += self.cfg.eval_every
        return True


def train(cfg: RunConfig, out_dir: str | Path) -> Path:
    """Train one run and write ``returns.csv``, ``config.json`` and ``model.zip`` under ``out_dir``.

    ``returns.csv`` holds ``timesteps, mean_return, std_return, episodes, wall_seconds``; ``updates.csv`` the
    statistics of every policy update (PPO: ``approx_kl``, ``clip_fraction``, ...; TRPO: ``kl_divergence_loss``,
    ...); ``config.json`` the resolved config, the actor's parameter count, provenance (package version, git
    commit) and, once the run finished, ``"finished": true`` and the digests of the files. With ``normalize``,
    ``vecnormalize.pkl`` holds the normalization statistics (:func:`load_run`). Returns ``out_dir``.
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
    callback = _EvalCallback(cfg, rows, out / "returns.csv", t0, out / "updates.csv")
    callback.init_callback(model)
    callback.record()  # the untrained policy, at step 0
    model.learn(total_timesteps=cfg.total_timesteps, callback=callback)
    callback.record_update()
    if not rows or rows[-1]["timesteps"] != model.num_timesteps:
        callback.record()
    model.save(out / "model.zip")
    files = ["returns.csv", "model.zip"] + (["updates.csv"] if callback.updates else [])
    norm = model.get_vec_normalize_env()
    if norm is not None:
        norm.save(str(out / "vecnormalize.pkl"))
        files.append("vecnormalize.pkl")
    meta.update(outputs=file_manifest(out, files))
    meta.update(finished=True, seconds=time.perf_counter() - t0, steps_per_second=cfg.total_timesteps / (
        time.perf_counter() - t0))
    atomic_write_text(out / "config.json", json.dumps(meta, indent=2))
    return out
