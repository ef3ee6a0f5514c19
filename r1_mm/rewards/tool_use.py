"""``tool_use``: DeepEyes' tool bonus, a reward for a successful tool call that is paid only when the answer is
right (R = R_acc + R_format + 1[R_acc > 0] R_tool). Rewarding calls alone teaches the policy to call for
nothing; rewarding them only with a right answer teaches it to call when the call helps.

The answer is judged by another reward of the registry (``answer_reward``, ``accuracy`` by default, with its
``answer_kwargs``), run on the same completions and rows.
"""

from __future__ import annotations

from typing import Any

from r1_mm.rewards.registry import RewardError, call_reward, get, reward
from r1_mm.rewards.signature import needed_columns


@reward("tool_use")
def tool_use(completions: list[Any], trajectories: list[dict[str, Any] | None] | None = None, *,
             answer_reward: str = "accuracy", answer_kwargs: dict[str, Any] | None = None,
             correct_above: float = 0.5, **columns: Any) -> list[float | None]:
    """1.0 when the trajectory executed at least one call (status ok) and ``answer_reward`` scores its answer
    above ``correct_above``, else 0.0; None for a completion that is not a tool trajectory (a run without
    tools, or a row the answer reward does not apply to)."""
    if trajectories is None:
        return [None] * len(completions)
    if answer_reward == "tool_use":
        raise RewardError("tool_use: answer_reward cannot be tool_use itself")
    judge = get(answer_reward)
    scores = call_reward(judge, completions=completions, **{**columns, **dict(answer_kwargs or {})})
    out: list[float | None] = []
    for trajectory, score in zip(trajectories, scores, strict=True):
        if trajectory is None or score is None:
            out.append(None)
        else:
            out.append(float(trajectory["executed_calls"] > 0 and float(score) > correct_above))
    return out


def _needs_for(kwargs: dict[str, Any]) -> set[str]:
    """The columns the answer reward needs (accuracy: solution)."""
    return needed_columns(get(kwargs.get("answer_reward", "accuracy")), dict(kwargs.get("answer_kwargs") or {}))


tool_use.needs_for = _needs_for
