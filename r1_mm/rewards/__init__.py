"""Reward functions and the reward registry."""
