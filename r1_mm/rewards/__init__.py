"""Reward functions and the reward registry: ``get(name)``, ``@reward(name)``, ``available()``."""

from r1_mm.rewards.registry import RewardError, available, get, reward

__all__ = ["RewardError", "available", "get", "reward"]
