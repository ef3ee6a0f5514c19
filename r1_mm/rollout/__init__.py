"""Rollout engines: prompts in, G completions out; weights in after each update."""

from r1_mm.rollout.base import Completion, PromptCompletions, RolloutEngine, SamplingSettings
from r1_mm.rollout.engines import ENGINES, make_engine, register_engine

__all__ = ["ENGINES", "Completion", "PromptCompletions", "RolloutEngine", "SamplingSettings", "make_engine",
           "register_engine"]
