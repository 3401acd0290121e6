r"""Compact actor-critic policies for stable-baselines3 PPO and sb3-contrib TRPO (paper section 6.2-6.3).

Two hidden layers of ``hidden`` units (paper: 64 for PPO, 32 for TRPO) with all three matrices of the actor
structured: ``architecture="kama"`` (:class:`kama.KamaLinear`, ``num_rotations`` Givens rotations per layer,
the first and last matrices truncated), ``"toeplitz"`` (:class:`kama.ToeplitzLinear`) or ``"mlp"`` (SB3's
unstructured ``nn.Linear`` baseline, identical to ``MlpPolicy`` with ``net_arch=[hidden, hidden]``). The critic
is dense (SB3's ``nn.Linear`` layers) unless ``structured_critic=True``: the paper compresses and counts the
actor, and on Hopper-v5 a KAMA critic kept PPO at a return of ~175 for 300k steps where the same KAMA actor
with a dense critic kept improving (README, "RL evidence").

Initialization follows SB3's orthogonal scheme with the same gains (sqrt 2 hidden, 0.01 action head, 1 value
head): a KAMA layer with random angles is a (truncated) orthogonal matrix, so its scalars are set to the gain
and its bias to 0; a Toeplitz layer draws ``N(0, gain^2 / max(in, out))`` coefficients.

Parameter names keep SB3's conventions (``mlp_extractor.policy_net``, ``mlp_extractor.value_net``,
``action_net``, ``value_net``): TRPO treats every parameter whose name contains ``value`` as the critic's.
Fixed planes are buffers, never frozen parameters (TRPO differentiates every actor parameter).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import torch
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.preprocessing import get_action_dim
from torch import nn

from .._checks import check_bool, check_choice, check_int
from ..nn import DEFAULT_ANGLE_GAIN, DEFAULT_PLANE_SAMPLER, PLANE_SAMPLERS, KamaLinear, ToeplitzLinear, check_angle_gain

__all__ = ["ARCHITECTURES", "KamaActorCriticPolicy", "StructuredMlpExtractor", "structured_layer",
           "actor_parameter_count", "check_spaces", "check_env"]

ARCHITECTURES: tuple[str, ...] = ("kama", "toeplitz", "mlp")


def structured_layer(architecture: str, in_features: int, out_features: int, *, gain: float,
                     num_rotations: int = 200, learn_planes: bool = False, angle_gain: float | str = DEFAULT_ANGLE_GAIN,
                     plane_sampler: str = DEFAULT_PLANE_SAMPLER) -> nn.Module:
    """One layer of the given architecture, initialized like SB3's orthogonal init with ``gain``.

    KAMA layers start with every scalar at ``gain`` (their rotation is orthogonal already) and a zero bias;
    ``angle_gain`` and ``plane_sampler`` are :class:`kama.KamaLinear`'s (``"dense"`` computes the angle gain for
    the initial scalars ``gain``)."""
    architecture = check_choice("architecture", architecture, ARCHITECTURES)
    if architecture == "mlp":
        dense = nn.Linear(in_features, out_features)
        nn.init.orthogonal_(dense.weight, gain=gain)
        nn.init.zeros_(dense.bias)
        return dense
    if architecture == "kama":
        rotations = KamaLinear(in_features, out_features, num_rotations=num_rotations, learn_planes=learn_planes,
                               angle_gain=angle_gain, plane_sampler=plane_sampler, init_scale=gain)
        with torch.no_grad():
            if rotations.bias is not None:
                rotations.bias.zero_()
        return rotations
    toeplitz = ToeplitzLinear(in_features, out_features)
    with torch.no_grad():
        toeplitz.coeffs.normal_(0.0, gain / math.sqrt(max(in_features, out_features)))
        if toeplitz.bias is not None:
            toeplitz.bias.zero_()
    return toeplitz


class StructuredMlpExtractor(nn.Module):
    """SB3's ``mlp_extractor`` contract (``latent_dim_pi``, ``latent_dim_vf``, ``forward_actor``,
    ``forward_critic``) with two structured hidden layers per network."""

    def __init__(self, feature_dim: int, hidden: int, architecture: str, num_rotations: int,
                 structured_critic: bool, learn_planes: bool, activation_fn: type[nn.Module],
                 angle_gain: float | str = DEFAULT_ANGLE_GAIN, plane_sampler: str = DEFAULT_PLANE_SAMPLER) -> None:
        super().__init__()
        kama: dict[str, Any] = {"num_rotations": num_rotations, "learn_planes": learn_planes, "angle_gain": angle_gain,
                "plane_sampler": plane_sampler}

        def net(arch: str) -> nn.Sequential:
            return nn.Sequential(
                structured_layer(arch, feature_dim, hidden, gain=math.sqrt(2), **kama), activation_fn(),
                structured_layer(arch, hidden, hidden, gain=math.sqrt(2), **kama), activation_fn())

        self.policy_net = net(architecture)
        self.value_net = net(architecture if structured_critic else "mlp")
        self.latent_dim_pi = hidden
        self.latent_dim_vf = hidden

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy_net(features), self.value_net(features)

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        return self.policy_net(features)

    def forward_critic(self, features: torch.Tensor) -> torch.Tensor:
        return self.value_net(features)


def check_spaces(observation_space: gym.Space, action_space: gym.Space) -> None:
    """Box observations and Box actions (MuJoCo-style control) are supported; anything else is an error."""
    if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 1:
        raise ValueError(f"observation space must be a 1-D gymnasium.spaces.Box, got {observation_space}")
    if not isinstance(action_space, gym.spaces.Box) or len(action_space.shape) != 1:
        raise ValueError(f"action space must be a 1-D gymnasium.spaces.Box, got {action_space}")


def check_env(env_id: str) -> None:
    """A registered gymnasium id whose observation and action spaces are 1-D Boxes (creates one environment)."""
    try:
        gym.spec(env_id)
    except gym.error.Error as e:
        raise ValueError(f"env_id {env_id!r} is not a registered gymnasium environment ({e})") from None
    env = gym.make(env_id)
    try:
        check_spaces(env.observation_space, env.action_space)
    finally:
        env.close()


class KamaActorCriticPolicy(ActorCriticPolicy):
    """Actor-critic policy with KAMA, Toeplitz or dense layers, for ``PPO`` and sb3-contrib ``TRPO``.

    Args:
        observation_space, action_space, lr_schedule: as ``ActorCriticPolicy``.
        architecture: ``"kama"``, ``"toeplitz"`` or ``"mlp"``.
        hidden: units of each of the two hidden layers (h).
        num_rotations: Givens rotations per KAMA layer (K).
        structured_critic: structure the critic too (default: dense).
        learn_planes: KAMA layers learn their planes (paper section 6.3).
        angle_gain: KAMA layers' angle gain (:class:`kama.KamaLinear`): ``"dense"`` or a float (1.0: the
            paper's parametrization).
        plane_sampler: KAMA layers' planes: ``"live"`` (no dead rotation, the default) or ``"iid"`` (the paper's).
        **kwargs: forwarded to ``ActorCriticPolicy`` (``log_std_init``, ``activation_fn``, ...); ``net_arch``
            is rejected (the architecture is ``hidden`` x 2).

    Example:
        >>> from stable_baselines3 import PPO
        >>> model = PPO(KamaActorCriticPolicy, "InvertedPendulum-v5", n_steps=64, batch_size=32,
        ...             policy_kwargs={"architecture": "kama", "hidden": 16, "num_rotations": 40})
        >>> type(model.policy.action_net).__name__
        'KamaLinear'
    """

    def __init__(self, observation_space: gym.Space, action_space: gym.Space, lr_schedule: Any, *,
                 architecture: str = "kama", hidden: int = 64, num_rotations: int = 200,
                 structured_critic: bool = False, learn_planes: bool = False,
                 angle_gain: float | str = DEFAULT_ANGLE_GAIN, plane_sampler: str = DEFAULT_PLANE_SAMPLER,
                 **kwargs: Any) -> None:
        check_spaces(observation_space, action_space)
        self.architecture = check_choice("architecture", architecture, ARCHITECTURES)
        self.hidden = check_int("hidden", hidden, minimum=1)
        self.num_rotations = check_int("num_rotations", num_rotations, minimum=1)
        self.structured_critic = check_bool("structured_critic", structured_critic)
        self.learn_planes = check_bool("learn_planes", learn_planes)
        self.angle_gain = check_angle_gain(angle_gain)
        self.plane_sampler = check_choice("plane_sampler", plane_sampler, PLANE_SAMPLERS)
        if kwargs.get("net_arch") is not None:
            raise ValueError(f"net_arch is not used by KamaActorCriticPolicy (two hidden layers of `hidden` units); "
                             f"got net_arch={kwargs['net_arch']!r}")
        kwargs.pop("net_arch", None)
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _kama_kwargs(self) -> dict[str, Any]:
        return {"num_rotations": self.num_rotations, "learn_planes": self.learn_planes,
                "angle_gain": self.angle_gain, "plane_sampler": self.plane_sampler}

    def _layer(self, arch: str, i: int, o: int, gain: float) -> nn.Module:
        return structured_layer(arch, i, o, gain=gain, **self._kama_kwargs())

    def _build_mlp_extractor(self) -> None:
        # SB3 types the attribute as its MlpExtractor; this class keeps the same contract (see its docstring)
        self.mlp_extractor = StructuredMlpExtractor(  # type: ignore[assignment]
            self.features_dim, self.hidden, self.architecture, self.num_rotations, self.structured_critic,
            self.learn_planes, self.activation_fn, angle_gain=self.angle_gain, plane_sampler=self.plane_sampler)

    def _build(self, lr_schedule: Any) -> None:
        super()._build(lr_schedule)
        if self.architecture != "mlp":
            if not isinstance(self.action_dist, DiagGaussianDistribution):  # pragma: no cover - Box only
                raise ValueError(f"unsupported action distribution {type(self.action_dist).__name__}")
            action_dim = get_action_dim(self.action_space)
            # SB3 types the heads as nn.Linear; any module mapping (*, hidden) -> (*, out) serves
            self.action_net = self._layer(self.architecture, self.hidden, action_dim, 0.01)
            if self.structured_critic:
                self.value_net = self._layer(self.architecture, self.hidden, 1, 1.0)  # type: ignore[assignment]
            # The new heads must be in the optimizer, or they silently never train.
            self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1),  # type: ignore[call-arg]
                                                  **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.pop("net_arch", None)
        data.update(architecture=self.architecture, hidden=self.hidden, num_rotations=self.num_rotations,
                    structured_critic=self.structured_critic, learn_planes=self.learn_planes,
                    angle_gain=self.angle_gain, plane_sampler=self.plane_sampler)
        return data


def _count(module: nn.Module) -> int:
    if isinstance(module, (KamaLinear, ToeplitzLinear)):
        return module.num_parameters()
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def actor_parameter_count(policy: ActorCriticPolicy) -> int:
    """Learned parameters of the actor's three matrices as the paper's Table 1 counts them: for KAMA, angles +
    renormalization scalars + bias per layer; for Toeplitz, diagonals + bias; for dense, weights + bias.
    ``log_std`` is excluded."""
    layers = list(policy.mlp_extractor.policy_net) + [policy.action_net]
    return sum(_count(m) for m in layers if isinstance(m, (nn.Linear, KamaLinear, ToeplitzLinear)))
