"""Rewards on the form of a completion, not its correctness: tags, length and repetition.

They need no solution column, so they apply to every row (and never return None).
"""

from __future__ import annotations

import re
from typing import Any

from r1_mm.rewards.parsing import completion_text
from r1_mm.rewards.registry import reward


@reward("format")
def format_reward(completions: list[Any], trajectories: list[dict[str, Any] | None] | None = None, *,
                  think_tag: str = "think", answer_tag: str = "answer", require_think: bool = True,
                  pattern: str | None = None, **_: Any) -> list[float]:
    """1.0 for exactly ``<think>...</think><answer>...</answer>`` (whitespace between allowed).

    ``pattern``: a regular expression the whole (stripped) completion must match instead, e.g.
    ``"\\d+"`` for a bare number. A tool trajectory is judged by its last model turn (the answer's; its
    earlier turns hold the calls, whose form the call parser checks and counts).
    """
    if trajectories is not None:
        completions = [t["final_text"] if t is not None else c for c, t in zip(completions, trajectories, strict=True)]
    if pattern is not None:
        custom = re.compile(pattern, re.DOTALL)
        return [1.0 if custom.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]
    think = rf"<{re.escape(think_tag)}>(?:(?!<{re.escape(think_tag)}>).)*?</{re.escape(think_tag)}>\s*" \
        if require_think else ""
    answer = rf"<{re.escape(answer_tag)}>(?:(?!<{re.escape(answer_tag)}>).)*?</{re.escape(answer_tag)}>"
    tagged = re.compile(rf"\s*{think}{answer}\s*", re.DOTALL)
    return [1.0 if tagged.fullmatch(completion_text(c)) else 0.0 for c in completions]


def soft_overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO: 0 up to max - buffer tokens, then linear down to -1 at max, -1 beyond."""
    if length <= max_length - buffer:
        return 0.0
    if length <= max_length:
        return (max_length - buffer - length) / buffer
    return -1.0


@reward("overlong")
def overlong(completions: list[Any], completion_ids: list[list[int]] | None = None, *,
             max_completion_length: int | None = None, buffer: int | None = None, **_: Any) -> list[float]:
    """DAPO's soft overlong punishment on token counts. ``max_completion_length`` defaults to the
    recipe's ``rollout.max_completion_length``; ``buffer`` to a fifth of it."""
    if completion_ids is None:
        raise KeyError("reward 'overlong' needs completion_ids (token counts)")
    if max_completion_length is None:
        raise KeyError("reward 'overlong' needs max_completion_length (set it in the reward's kwargs)")
    window = buffer if buffer is not None else max(1, max_completion_length // 5)
    if not 0 < window <= max_completion_length:
        raise ValueError(f"overlong buffer must be in (0, {max_completion_length}], got {window}")
    return [soft_overlong_penalty(len(ids), max_completion_length, window) for ids in completion_ids]


def repeated_ngram_fraction(words: list[str], n: int) -> float:
    """Share of the text's n-grams that repeat an earlier one (0 = no repetition)."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@reward("repetition")
def repetition(completions: list[Any], *, ngram_size: int = 3, max_penalty: float = -1.0, **_: Any) -> list[float]:
    """``max_penalty`` x the fraction of repeated word n-grams: 0 for varied text, down to max_penalty."""
    if max_penalty > 0:
        raise ValueError(f"repetition max_penalty must be <= 0, got {max_penalty}")
    return [max_penalty * repeated_ngram_fraction(completion_text(c).lower().split(), ngram_size)
            for c in completions]
