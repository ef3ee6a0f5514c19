"""The rollout engine interface: prompts (messages + decoded media) in, G completions each out.

Engines receive :class:`~r1_mm.data.prompts.Sample` objects (raw media plus messages), never
pre-tokenised ids with images, so no engine can re-process images differently from the learner. (A tool
trajectory is continued from its token ids, the sampler's own; its images go along as pixels, and an engine
that expands their placeholders itself checks that it got the learner's ids: ``vllm_colocate``.)
The engines are found by name in :mod:`r1_mm.rollout.engines`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from r1_mm.config.recipe import RolloutConfig
from r1_mm.data.prompts import Sample
from r1_mm.data.turns import ToolContext


@dataclass(frozen=True)
class SamplingSettings:
    """Per-call sampling knobs, named as in vLLM's SamplingParams."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    @classmethod
    def from_config(cls, cfg: RolloutConfig, seed: int | None = None) -> SamplingSettings:
        return cls(max_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
                   top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty, seed=seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class ToolTurn:
    """One tool turn of a trajectory: the calls the model wrote in the turn before it and what each gave."""

    calls: list[dict[str, Any]] = field(default_factory=list)  # {"name", "arguments", "status", "text", "images", ...}
    images: list[Any] = field(default_factory=list)  # the PIL images the model was shown, budgeted, in order

    @property
    def executed(self) -> int:
        """Calls that ran and returned (status ok)."""
        return sum(c["status"] == "ok" for c in self.calls)


@dataclass
class TrajectoryRecord:
    """What happened in a multi-turn trajectory, for rewards, metrics and the completions log."""

    turns: list[ToolTurn] = field(default_factory=list)
    model_turns: int = 1
    final_text: str = ""  # the model's last turn (where its answer is)
    stop_reason: str = ""  # answer, max_turns, max_tool_calls, max_total_tokens or truncated

    @property
    def calls(self) -> list[dict[str, Any]]:
        return [c for turn in self.turns for c in turn.calls]

    @property
    def executed_calls(self) -> int:
        return sum(turn.executed for turn in self.turns)

    def to_dict(self) -> dict[str, Any]:
        """The form rewards receive (``trajectories=``) and completions.jsonl stores."""
        return {"model_turns": self.model_turns, "calls": self.calls, "executed_calls": self.executed_calls,
                "final_text": self.final_text, "stop_reason": self.stop_reason}


@dataclass
class Completion:
    """One sampled completion of one prompt; with tools, a whole trajectory (model turns and tool turns)."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None  # the sampler's logprob of each token (None if the engine has none; 0 at tool tokens)
    truncated: bool  # hit max_tokens without an end-of-sequence token
    # multi-turn trajectories only: which tokens the model sampled and the tool images (what the learner needs),
    # and what happened (what rewards and metrics read)
    context: ToolContext | None = None
    trajectory: TrajectoryRecord | None = None
    # partial rollouts (rollout.partial_rollout_tokens): the policy version that sampled each token, where a
    # completion was continued over weight updates (None: one version, the batch's policy_version)
    token_versions: list[int] | None = None


@dataclass
class PromptCompletions:
    sample: Sample
    completions: list[Completion] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None  # as the engine tokenised the prompt (vLLM engines report it)


class RolloutEngine(ABC):
    """Generates completions and receives new policy weights after each optimizer step."""

    name: str = "base"
    # sampling on its own devices or processes, so it may run while the learner trains (asynchronous rollouts:
    # concurrently); false: it shares the learner's device (or model) and runs between the learner's updates
    generates_beside_learner: bool = False

    @abstractmethod
    def generate(self, batch: list[Sample], n: int, sampling: SamplingSettings) -> list[PromptCompletions]:
        """G = ``n`` completions for every prompt of ``batch``, in order."""

    @abstractmethod
    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the next ``generate`` use ``model``'s current weights."""

    def close(self) -> None:  # engines holding servers or processes release them here
        return None

    def info(self) -> dict[str, Any]:
        """What the engine really runs with (recorded in run_info.json)."""
        return {}


def media_token_ids(config: Any) -> list[int]:
    """Placeholder tokens a completion must never contain.

    A sampled ``<|image_pad|>`` in a completion makes the learner's forward count more image tokens
    than image features and crash, so every engine suppresses these tokens when sampling.
    """
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
             "image_token_index", "video_token_index")
    ids = {getattr(config, n, None) for n in names}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens a turn ends on: the tokenizer's end-of-sequence token and the generation config's (what
    transformers' ``generate`` and vLLM both stop on)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return {i for i in ids if i is not None}
