"""Rewards for answers that localise: time segments in a video and boxes in an image (IoU in [0, 1])."""

from __future__ import annotations

from typing import Any

from r1_mm.rewards.parsing import numbers, score_each
from r1_mm.rewards.registry import reward


def interval_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """IoU of two [start, end] intervals; 0 for an empty or reversed interval."""
    if a[1] <= a[0] or b[1] <= b[0]:
        return 0.0
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / (max(a[1], b[1]) - min(a[0], b[0]))


def box_iou(a: list[float], b: list[float]) -> float:
    """IoU of two [x1, y1, x2, y2] boxes; 0 for an empty or reversed box."""
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _gold(value: Any, count: int, what: str) -> list[float]:
    found = [float(v) for v in value] if isinstance(value, (list, tuple)) else numbers(str(value), count)
    if len(found) != count:
        raise ValueError(f"solution {value!r} is not a {what} of {count} numbers")
    return found


def _localisation_reward(name: str, completions: list[Any], solution: list[Any] | None, count: int, what: str,
                         iou, *, tag: str, require_tag: bool) -> list[float | None]:
    def score(answer: str, sol: Any, _: int) -> float:
        gold = _gold(sol, count, what)
        pred = numbers(answer, count)
        return iou(pred, gold) if len(pred) == count else 0.0

    return score_each(name, completions, solution, score, tag=tag, require_tag=require_tag)


@reward("temporal_iou", needs=("solution",))
def temporal_iou(completions: list[Any], solution: list[Any] | None = None, *, tag: str = "answer",
                 require_tag: bool = True, **_: Any) -> list[float | None]:
    """IoU of the answer's ``[start, end]`` (seconds) with the solution's; 0 when no segment is given."""
    return _localisation_reward("temporal_iou", completions, solution, 2, "[start, end] segment",
                                lambda p, g: interval_iou((p[0], p[1]), (g[0], g[1])), tag=tag,
                                require_tag=require_tag)


@reward("bbox_iou", needs=("solution",))
def bbox_iou(completions: list[Any], solution: list[Any] | None = None, *, tag: str = "answer",
             require_tag: bool = True, **_: Any) -> list[float | None]:
    """IoU of the answer's ``[x1, y1, x2, y2]`` box with the solution's; 0 when no box is given."""
    return _localisation_reward("bbox_iou", completions, solution, 4, "[x1, y1, x2, y2] box", box_iou, tag=tag,
                                require_tag=require_tag)
