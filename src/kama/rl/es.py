r"""Evolution strategies for compact policies: Augmented Random Search (sb3-contrib ``ARS``) on KAMA, Toeplitz
and MLP policies, with observation normalization (``VecNormalize``), antithetic perturbations and top-direction
selection as ARS defines them, and rollouts through :class:`kama.rl.fast.FastActor`.

The optimizer is sb3-contrib's ARS (Mania et al., 2018), not a home-made one; this module adds the structured
policy, its fast inference and a Ray evaluator. Candidates are evaluated in this process (``workers=1``), by
sb3-contrib's ``AsyncEval`` worker processes (``workers > 1``, ``backend="local"``) or by Ray actors
(``backend="ray"``: :class:`RayAsyncEval`, the same protocol on a cluster). Worker ``i`` always owns the
environment seeded ``seed + 1 + i`` and candidates ``i, i + workers, ...``, so a seed gives the same run with
either backend.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from sb3_contrib import ARS
from sb3_contrib.ars.policies import ARSPolicy
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecNormalize
from torch import nn

from .._checks import check_bool, check_choice, check_int
from ..nn import DEFAULT_ANGLE_GAIN, DEFAULT_PLANE_SAMPLER, PLANE_SAMPLERS, check_angle_gain
from ..records import atomic_write_text, provenance, write_csv
from .fast import FastActor
from .policies import ARCHITECTURES, check_env, check_spaces, structured_layer

__all__ = ["StructuredARSPolicy", "ESConfig", "validate_es", "make_es_model", "train_es", "RayAsyncEval",
           "ES_BACKENDS"]

ES_BACKENDS: tuple[str, ...] = ("local", "ray")


class StructuredARSPolicy(ARSPolicy):
    """ARS policy ``obs -> h -> h -> action`` with KAMA, Toeplitz or dense layers (tanh hidden activations,
    tanh-squashed actions), whose deterministic actions are computed by :class:`FastActor`. The matrices are
    re-materialized after ``load_from_vector`` (how ARS sets every candidate) and whenever a parameter's
    storage or version changes (in-place updates); writes through ``.data`` must go through
    ``load_from_vector``.

    Args:
        observation_space, action_space: Box spaces.
        architecture: ``"kama"``, ``"toeplitz"`` or ``"mlp"``.
        hidden: hidden units; num_rotations: K per KAMA layer.
        action_gain: initial gain of the action layer (SB3's 0.01 by default). A KAMA action layer's output
            magnitude is set by one scalar per action, and its angles act only through that scalar, so at a
            small gain ES explores few observation-dependent actions; on Swimmer-v5 ARS leaves KAMA policies on
            the ~33 plateau with 0.01 and 0.3, and one seed of three leaves it with 1.0 (README, ES evidence).
        angle_gain, plane_sampler: the KAMA layers' (:class:`kama.KamaLinear`): ``"dense"`` scales every angle
            so that a unit step of all parameters moves a layer's weight as far as a dense layer's (ARS perturbs
            every parameter by the same ``sigma``); ``"live"`` draws no dead rotation.
    """

    def __init__(self, observation_space: gym.Space, action_space: gym.Space, architecture: str = "kama",
                 hidden: int = 64, num_rotations: int = 200, action_gain: float = 0.01,
                 angle_gain: float | str = DEFAULT_ANGLE_GAIN, plane_sampler: str = DEFAULT_PLANE_SAMPLER,
                 **kwargs: Any) -> None:
        check_spaces(observation_space, action_space)
        self.architecture = check_choice("architecture", architecture, ARCHITECTURES)
        self.hidden = check_int("hidden", hidden, minimum=1)
        self.num_rotations = check_int("num_rotations", num_rotations, minimum=1)
        if not (isinstance(action_gain, (int, float)) and action_gain > 0):
            raise ValueError(f"action_gain must be a positive number, got {action_gain!r}")
        self.action_gain = float(action_gain)
        self.angle_gain = check_angle_gain(angle_gain)
        self.plane_sampler = check_choice("plane_sampler", plane_sampler, PLANE_SAMPLERS)
        super().__init__(observation_space, action_space, net_arch=[hidden, hidden], activation_fn=nn.Tanh,
                         squash_output=True)
        obs_dim, act_dim = int(np.prod(observation_space.shape or (1,))), int(np.prod(action_space.shape or (1,)))
        kw: dict[str, Any] = {"num_rotations": num_rotations, "angle_gain": self.angle_gain,
                              "plane_sampler": self.plane_sampler}
        layers = [structured_layer(architecture, obs_dim, hidden, gain=math.sqrt(2), **kw), nn.Tanh(),
                  structured_layer(architecture, hidden, hidden, gain=math.sqrt(2), **kw), nn.Tanh(),
                  structured_layer(architecture, hidden, act_dim, gain=self.action_gain, **kw), nn.Tanh()]
        self.action_net = nn.Sequential(*layers)
        self._fast: FastActor | None = None
        self._fast_key: tuple | None = None

    def load_from_vector(self, vector: np.ndarray) -> None:
        """Set the parameters (ARS's way of loading a candidate) and drop the materialized actor."""
        super().load_from_vector(vector)
        self._fast = None

    def _fast_actor(self) -> FastActor:
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._fast is None or key != self._fast_key:
            self._fast = FastActor(list(self.action_net), dtype=np.float32)
            self._fast_key = key
        return self._fast

    def _predict(self, observation: torch.Tensor | dict[str, torch.Tensor], deterministic: bool = True) -> torch.Tensor:
        if isinstance(observation, torch.Tensor) and observation.device.type == "cpu" and not torch.is_grad_enabled():
            out = self._fast_actor()(observation.detach().numpy())
            return torch.from_numpy(np.asarray(out, dtype=np.float32))
        return self(observation)

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None,
                deterministic: bool = False) -> tuple[np.ndarray, Any]:
        """SB3's ``predict`` (actions rescaled to the action bounds, batch dimension kept or removed as given)
        without torch on the hot path: NumPy observations go straight through :class:`FastActor`. Anything
        else (dicts, wrong shapes) takes SB3's own path, with its checks and errors."""
        shape = tuple(self.observation_space.shape or ())
        if not isinstance(observation, np.ndarray) or observation.dtype.kind not in "fiu" \
                or observation.shape[-len(shape):] != shape or observation.ndim > len(shape) + 1:
            return super().predict(observation, state, episode_start, deterministic)
        single = observation.ndim == len(shape)
        obs = observation.reshape(-1, *shape)
        actions = np.asarray(self._fast_actor()(obs if not single else obs[0]), dtype=np.float32)
        actions = self.unscale_action(actions.reshape(-1, *(self.action_space.shape or ())))
        return (actions[0] if single else actions), state

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {"observation_space": self.observation_space, "action_space": self.action_space,
                "architecture": self.architecture, "hidden": self.hidden, "num_rotations": self.num_rotations,
                "action_gain": self.action_gain, "angle_gain": self.angle_gain, "plane_sampler": self.plane_sampler}


@dataclass(frozen=True)
class ESConfig:
    """One evolution-strategies run.

    Attributes:
        env_id: gymnasium id with Box spaces (e.g. ``Swimmer-v5``).
        architecture, hidden, num_rotations, action_gain, angle_gain, plane_sampler: the policy (see
            :class:`StructuredARSPolicy`).
        total_timesteps: environment steps.
        population: candidates per iteration (``2 n_delta``: antithetic pairs), >= 2 and even.
        n_top: directions kept per update (default: all).
        sigma: standard deviation of the parameter perturbations (> 0).
        learning_rate: ARS step size.
        normalize_observations: running observation normalization (``VecNormalize``).
        eval_every, eval_episodes: evaluation schedule (deterministic, normalized observations).
        workers: candidate-evaluation workers (1: this process).
        backend: ``"local"`` (worker processes on this machine) or ``"ray"`` (Ray actors; ``RAY_ADDRESS`` or
            ``ray_address`` names the cluster, else a local instance is started).
        ray_address: Ray cluster address (``backend="ray"`` only).
        seed: seed of ARS, the policy and the environments.
    """

    env_id: str = "Swimmer-v5"
    architecture: str = "kama"
    hidden: int = 16
    num_rotations: int = 50
    action_gain: float = 0.01
    angle_gain: float | str = DEFAULT_ANGLE_GAIN
    plane_sampler: str = DEFAULT_PLANE_SAMPLER
    total_timesteps: int = 200_000
    population: int = 16
    n_top: int | None = None
    sigma: float = 0.05
    learning_rate: float = 0.02
    normalize_observations: bool = True
    eval_every: int = 10_000
    eval_episodes: int = 3
    workers: int = 1
    backend: str = "local"
    ray_address: str | None = None
    seed: int = 0


def validate_es(cfg: ESConfig, *, check_environment: bool = True) -> None:
    """Typed errors naming the field before any rollout (``check_environment``: also create the environment once
    to check its spaces)."""
    check_choice("architecture", cfg.architecture, ARCHITECTURES)
    check_int("hidden", cfg.hidden, minimum=1)
    check_int("num_rotations", cfg.num_rotations, minimum=1)
    if not (isinstance(cfg.action_gain, (int, float)) and cfg.action_gain > 0):
        raise ValueError(f"action_gain must be a positive number, got {cfg.action_gain!r}")
    check_angle_gain(cfg.angle_gain)
    check_choice("plane_sampler", cfg.plane_sampler, PLANE_SAMPLERS)
    check_int("total_timesteps", cfg.total_timesteps, minimum=1)
    population = check_int("population", cfg.population, minimum=2)
    if population % 2:
        raise ValueError(f"population must be even (antithetic pairs), got {population}")
    if cfg.n_top is not None:
        check_int("n_top", cfg.n_top, minimum=1)
        if cfg.n_top > population // 2:
            raise ValueError(f"n_top must be <= population / 2 = {population // 2}, got {cfg.n_top}")
    if not (isinstance(cfg.sigma, (int, float)) and cfg.sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {cfg.sigma!r}")
    if not (isinstance(cfg.learning_rate, (int, float)) and cfg.learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive number, got {cfg.learning_rate!r}")
    check_int("eval_every", cfg.eval_every, minimum=1)
    check_int("eval_episodes", cfg.eval_episodes, minimum=1)
    check_bool("normalize_observations", cfg.normalize_observations)
    check_int("workers", cfg.workers, minimum=1)
    check_choice("backend", cfg.backend, ES_BACKENDS)
    check_int("seed", cfg.seed, minimum=0)
    if not isinstance(cfg.env_id, str):
        raise TypeError(f"env_id must be a gymnasium id (a str), got {type(cfg.env_id).__name__} ({cfg.env_id!r})")
    if check_environment:
        check_env(cfg.env_id)


class _RolloutWorker:
    """One Ray actor: an environment (with its own observation filter) and a policy that loads candidates.
    The same steps as sb3-contrib's ``AsyncEval`` worker process, so both backends give the same returns."""

    def __init__(self, make_env: Any, policy: Any) -> None:
        from stable_baselines3.common.vec_env import unwrap_vec_normalize

        torch.set_num_threads(1)
        self.env = make_env()
        self.policy = policy
        self.norm = unwrap_vec_normalize(self.env)

    def evaluate(self, jobs: list[tuple[int, np.ndarray]], n_eval_episodes: int) -> list[tuple[int, tuple]]:
        results = []
        for idx, weights in jobs:
            self.policy.load_from_vector(weights)
            rewards, lengths = evaluate_policy(self.policy, self.env, n_eval_episodes=n_eval_episodes,
                                               return_episode_rewards=True, warn=False)
            results.append((idx, (rewards, lengths)))
        return results

    def seed(self, seed: int) -> Any:
        return self.env.seed(seed=seed)

    def set_options(self, options: Any) -> Any:
        return self.env.set_options(options)

    def get_obs_rms(self) -> Any:
        return None if self.norm is None else self.norm.obs_rms

    def sync_obs_rms(self, obs_rms: Any) -> None:
        if self.norm is None:
            raise RuntimeError("sync_obs_rms needs environments wrapped in VecNormalize")
        self.norm.obs_rms = obs_rms

    def close(self) -> None:
        self.env.close()


class RayAsyncEval:
    """sb3-contrib's ``AsyncEval`` protocol (what ``ARS.learn(async_eval=...)`` calls) served by Ray actors,
    one per environment factory, so that candidate rollouts run across a Ray cluster.

    Candidate ``c`` goes to worker ``c % len(envs_fn)``, as in ``AsyncEval``; results, observation filters
    and seeds are gathered in worker order, so the run does not depend on which machine answers first.

    Args:
        envs_fn: one callable per worker returning its (VecNormalize-wrapped) vectorized environment.
        train_policy: the policy each worker copies to load candidates into.
        n_eval_episodes: episodes per candidate.
        address: Ray cluster address (default: ``RAY_ADDRESS``, else a local instance started here and shut down
            by :meth:`close`).
    """

    def __init__(self, envs_fn: list[Any], train_policy: Any, n_eval_episodes: int = 1,
                 address: str | None = None) -> None:
        try:
            import ray
        except ImportError as e:  # pragma: no cover - depends on the ray extra
            raise ImportError("backend='ray' needs the ray extra: pip install 'kama-nn[ray]'") from e
        import os

        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                     log_to_driver=False)
            self._started = True
        actor = ray.remote(num_cpus=1)(_RolloutWorker)
        self.remotes: list[Any] = [actor.remote(fn, train_policy) for fn in envs_fn]
        self.n_eval_episodes = n_eval_episodes
        self._pending: list[Any] | None = None
        self.closed = False

    @property
    def waiting(self) -> bool:
        return self._pending is not None

    def send_jobs(self, candidate_weights: torch.Tensor, pop_size: int) -> None:
        jobs: list[list[tuple[int, torch.Tensor]]] = [[] for _ in self.remotes]
        for idx in range(pop_size):
            jobs[idx % len(self.remotes)].append((idx, candidate_weights[idx].detach().cpu()))
        self._pending = [w.evaluate.remote(j, self.n_eval_episodes) for w, j in zip(self.remotes, jobs, strict=True)]

    def get_results(self) -> list[tuple[int, tuple]]:
        if self._pending is None:
            raise RuntimeError("get_results called before send_jobs")
        results = self._ray.get(self._pending)
        self._pending = None
        return [r for worker in results for r in worker]

    def seed(self, seed: int | None = None) -> list[Any]:
        if seed is None:
            return []
        return self._ray.get([w.seed.remote(seed + i) for i, w in enumerate(self.remotes)])

    def set_options(self, options: Any = None) -> list[Any]:
        return self._ray.get([w.set_options.remote(options) for w in self.remotes])

    def get_obs_rms(self) -> list[Any]:
        return self._ray.get([w.get_obs_rms.remote() for w in self.remotes])

    def sync_obs_rms(self, obs_rms: Any) -> None:
        self._ray.get([w.sync_obs_rms.remote(obs_rms) for w in self.remotes])

    def close(self) -> None:
        if self.closed:
            return
        if self._pending is not None:
            self._ray.get(self._pending)
            self._pending = None
        self._ray.get([w.close.remote() for w in self.remotes])
        for w in self.remotes:
            self._ray.kill(w)
        if self._started:
            self._ray.shutdown()
        self.closed = True


def _vec_env(cfg: ESConfig, seed: int) -> Any:
    env = make_vec_env(cfg.env_id, n_envs=1, seed=seed)
    if cfg.normalize_observations:
        env = VecNormalize(env, norm_obs=True, norm_reward=False)
    return env


def make_es_model(cfg: ESConfig) -> ARS:
    """The ARS model of ``cfg`` (validated first)."""
    validate_es(cfg)
    return ARS(StructuredARSPolicy, _vec_env(cfg, cfg.seed), n_delta=cfg.population // 2, n_top=cfg.n_top,
               learning_rate=cfg.learning_rate, delta_std=cfg.sigma, seed=cfg.seed, device="cpu", zero_policy=False,
               policy_kwargs={"architecture": cfg.architecture, "hidden": cfg.hidden,
                              "num_rotations": cfg.num_rotations, "action_gain": cfg.action_gain,
                              "angle_gain": cfg.angle_gain, "plane_sampler": cfg.plane_sampler})


def _evaluate(model: BaseAlgorithm, cfg: ESConfig) -> list[float]:
    env = _vec_env(cfg, 10_000 + cfg.seed)
    if cfg.normalize_observations:
        train_env = model.get_vec_normalize_env()
        assert train_env is not None  # make_es_model wraps the environment when normalize_observations is set
        env.obs_rms = train_env.obs_rms.copy()
        env.training = False
    rewards, _ = evaluate_policy(model, env, n_eval_episodes=cfg.eval_episodes, deterministic=True,
                                 return_episode_rewards=True)
    env.close()
    return [float(r) for r in np.atleast_1d(rewards)]


class _ESCallback(BaseCallback):
    def __init__(self, cfg: ESConfig, rows: list[dict], path: Path, t0: float) -> None:
        super().__init__()
        self.cfg, self.rows, self.path, self.t0 = cfg, rows, path, t0
        self.next_eval = cfg.eval_every

    def record(self) -> None:
        rets = _evaluate(self.model, self.cfg)
        self.rows.append({"timesteps": int(self.model.num_timesteps), "mean_return": float(np.mean(rets)),
                          "std_return": float(np.std(rets)), "episodes": len(rets),
                          "wall_seconds": time.perf_counter() - self.t0})
        write_csv(self.path, self.rows)

    def _on_rollout_end(self) -> None:  # after each population has been evaluated
        if self.model.num_timesteps >= self.next_eval:
            self.record()
            while self.next_eval <= self.model.num_timesteps:
                self.next_eval += self.cfg.eval_every

    def _on_step(self) -> bool:
        return True


def train_es(cfg: ESConfig, out_dir: str | Path) -> Path:
    """Run ES and write ``returns.csv``, ``config.json`` (with provenance and ``finished``) and ``model.zip``."""
    validate_es(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = make_es_model(cfg)
    n_params = int(model.n_params)
    meta = {"config": dataclasses.asdict(cfg), "parameters": n_params, "finished": False, **provenance()}
    atomic_write_text(out / "config.json", json.dumps(meta, indent=2))
    rows: list[dict] = []
    t0 = time.perf_counter()
    cb = _ESCallback(cfg, rows, out / "returns.csv", t0)
    cb.init_callback(model)
    cb.record()
    async_eval: Any = None
    envs_fn: list[Callable[[], Any]] = [functools.partial(_vec_env, cfg, cfg.seed + 1 + i) for i in range(cfg.workers)]
    if cfg.backend == "ray":
        async_eval = RayAsyncEval(envs_fn, model.policy, address=cfg.ray_address)
    elif cfg.workers > 1:
        from sb3_contrib.common.vec_env import AsyncEval

        async_eval = AsyncEval(envs_fn, model.policy)
    try:
        model.learn(total_timesteps=cfg.total_timesteps, callback=cb, async_eval=async_eval)
    finally:
        if async_eval is not None:
            async_eval.close()
    if rows[-1]["timesteps"] != model.num_timesteps:
        cb.record()
    model.save(out / "model.zip")
    meta.update(finished=True, seconds=time.perf_counter() - t0)
    atomic_write_text(out / "config.json", json.dumps(meta, indent=2))
    return out
