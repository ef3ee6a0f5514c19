"""Turning a completion into the thing a reward compares: its text, its tagged answer, its numbers.

Every parser here takes any string (empty, huge, unicode, nested tags) and returns a value or None;
none of them raises or takes more than linear time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_TAG_CACHE: dict[str, re.Pattern[str]] = {}
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def completion_text(completion: Any) -> str:
    """Completions arrive as strings, or as conversational [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content)
    return str(completion)


def _tag_pattern(tag: str) -> re.Pattern[str]:
    if tag not in _TAG_CACHE:
        _TAG_CACHE[tag] = re.compile(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", re.DOTALL)
    return _TAG_CACHE[tag]


def extract_answer(text: str, tag: str = "answer") -> str | None:
    """The content of the last ``<tag>...</tag>``, stripped; None when there is none."""
    found = _tag_pattern(tag).findall(text)
    return found[-1].strip() if found else None


def answer_or_text(completion: Any, tag: str, require_tag: bool) -> str | None:
    """The tagged answer; the whole completion when tags are optional; None when a required tag is missing."""
    text = completion_text(completion)
    answer = extract_answer(text, tag)
    if answer is None and not require_tag:
        return text.strip()
    return answer


def first_number(text: str) -> float | None:
    """The first number written in ``text`` (commas as thousands separators allowed), else None."""
    match = NUMBER.search(text.replace(",", ""))
    if match is None:
        return None
    try:
        value = float(match.group(0))
    except (ValueError, OverflowError):
        return None
    return value if value == value and abs(value) != float("inf") else None


def numbers(text: str, limit: int) -> list[float]:
    """Up to ``limit`` numbers in order of appearance (for segments and boxes)."""
    out = []
    for match in NUMBER.finditer(text.replace(",", " ")):
        try:
            out.append(float(match.group(0)))
        except (ValueError, OverflowError):
            continue
        if len(out) == limit:
            break
    return out


def normalise(s: str) -> str:
    """Lowercase, trim trailing full stops, collapse whitespace: how answers are compared as strings."""
    return re.sub(r"\s+", " ", s.strip().strip(".").lower())


class RowError(ValueError):
    """A reward failed on one completion; ``index`` lets the runner name that row."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def require_column(reward_name: str, column: str, values: list[Any] | None) -> list[Any]:
    """The column's values, or a clear error naming the reward and the missing column."""
    if values is None:
        raise KeyError(f"reward '{reward_name}' needs a '{column}' column; the dataset rows have none")
    return values


def score_each(name: str, completions: list[Any], solution: list[Any] | None,
               score: Callable[[str, Any, int], float], *, tag: str, require_tag: bool) -> list[float | None]:
    """Apply ``score(answer, solution, index) -> float`` per completion; None where the solution is missing."""
    solutions = require_column(name, "solution", solution)
    out: list[float | None] = []
    for i, (completion, sol) in enumerate(zip(completions, solutions, strict=True)):
        if sol is None:
            out.append(None)
            continue
        answer = answer_or_text(completion, tag, require_tag)
        if isinstance(sol, str):  # R1-V / Video-R1 data write solutions as "<answer> 3 </answer>"
            sol = extract_answer(sol, tag) or sol
        try:
            out.append(0.0 if answer is None else float(score(answer, sol, i)))
        except (ValueError, TypeError, KeyError) as exc:
            raise RowError(i, str(exc)) from exc
    return out
