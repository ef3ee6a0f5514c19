"""An engine that writes given model turns instead of sampling them: SFT on tool-calling rows.

Why an engine and not a tokeniser of whole conversations: an SFT row that calls tools must be trained on
exactly what a GRPO rollout of it would hold. Replaying its model turns through :class:`ToolRollout` runs the
recipe's tools on the row's media and tokenises the tool turns the way a rollout does (the same chat-template
delta, the same image budget, the same vision tokens and positions), so the trajectory SFT trains on is the
one GRPO will later sample, token for token. Plain rows (one response) need no engine (see trainers/sft.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from r1_mm.data.prompts import Sample
from r1_mm.data.turns import ToolContext
from r1_mm.rollout.base import Completion, PromptCompletions, RolloutEngine, SamplingSettings


def model_turns_so_far(context: ToolContext) -> int:
    """How many model turns a trajectory holds: the runs of model-sampled tokens in its mask."""
    mask = context.model_mask
    return sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))


class ScriptedEngine(RolloutEngine):
    """Each sample's model turns come from ``turns_of(sample)``; a turn's ids are its text as the tokenizer
    writes it, then the end-of-turn token (where the model would stop). One completion per sample."""

    name = "scripted"

    def __init__(self, processor: Any, turns_of: Callable[[Sample], Sequence[str]]):
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.turns_of = turns_of
        self.eos = {self.tokenizer.eos_token_id}

    def turn(self, sample: Sample, index: int) -> Completion:
        turns = list(self.turns_of(sample))
        if index >= len(turns):
            raise ValueError(f"row {sample.row_id}: the trajectory needs model turn {index + 1} but the row has "
                             f"{len(turns)} (every turn but the last must call a tool, the last must not)")
        ids = list(self.tokenizer(turns[index], add_special_tokens=False)["input_ids"]) + [self.tokenizer.eos_token_id]
        return Completion(text=turns[index], token_ids=ids, logprobs=[0.0] * len(ids), truncated=False)

    def generate(self, batch: list[Sample], n: int, sampling: SamplingSettings) -> list[PromptCompletions]:
        if n != 1:
            raise ValueError("a scripted engine writes one completion per row (n=1)")
        return [PromptCompletions(sample=s, completions=[self.turn(s, 0)]) for s in batch]

    def continue_trajectory(self, sample: Sample, ids: list[int], context: ToolContext,
                            sampling: SamplingSettings, max_tokens: int) -> Completion:
        return self.turn(sample, model_turns_so_far(context))

    def update_weights(self, model: torch.nn.Module) -> None:
        return None  # nothing is sampled
