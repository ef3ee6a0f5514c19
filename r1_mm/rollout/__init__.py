"""Rollout engines: prompts in, G completions out; weights in after each update."""

from r1_mm.rollout.base import (
                               ENGINES,
                               Completion,
                               PromptCompletions,
                               RolloutEngine,
                               SamplingSettings,
                               make_engine,
                               register_engine,
)

__all__ = ["ENGINES", "Completion", "PromptCompletions", "RolloutEngine", "SamplingSettings", "make_engine",
           "register_engine"]
