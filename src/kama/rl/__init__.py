"""Compact RL policies (paper section 6.2-6.3) for stable-baselines3 and sb3-contrib (the ``rl`` extra).

stable-baselines3 is imported only inside this package.
"""

from .policies import ARCHITECTURES, KamaActorCriticPolicy, actor_parameter_count, check_spaces, structured_layer

__all__ = ["ARCHITECTURES", "KamaActorCriticPolicy", "actor_parameter_count", "check_spaces", "structured_layer"]
