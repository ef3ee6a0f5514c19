"""Turning a completion into the thing a reward compares: its text, its tagged answer, its numbers.

Every parser here takes any string (empty, huge, unicode, nested tags) and returns a value or None;
none of them raises or takes more than linear time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

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


def extract_answer(text: str, tag: str = "answer") -> str | None:
    """The content of the last ``<tag>...</tag>`` (the last closing tag and the opening tag nearest
    before it), stripped; None when there is none. Two reverse searches: linear in the text, however
    many unclosed tags it holds (a lazy regex was quadratic on those)."""
    close = text.rfind(f"</{tag}>")
    if close < 0:
        return None
    start = text.rfind(f"<{tag}>", 0, close)
    if start < 0:
        return None
    return text[start + len(tag) + 2:close].strip()


def answer_or_text(completion: Any, tag: str, require_tag: bool) -> str | None:
    """The tagged answer; the whole completion when tags are optional; None when a required tag is missing."""
    text = completion_text(completion)
    answer = extract_answer(text, tag)
    if answer is None and not require_tag:
        return text.strip()
    return answer


FRACTION = re.compile(r"\\[dt]?frac\{\s*([-+]?[\d.]+)\s*\}\{\s*([-+]?[\d.]+)\s*\}|"
                      r"(?<![\d.])([-+]?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)(?![\d./])")


def _finite(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


def first_number(text: str) -> float | None:
    """The first number written in ``text`` (commas as thousands separators allowed; a fraction
    ``3/4`` or ``\\frac{3}{4}`` is its value, not its numerator), else None."""
    text = text.replace(",", "")
    match = NUMBER.search(text)
    fraction = FRACTION.search(text)
    if fraction is not None and (match is None or fraction.start() <= match.start()):
        numerator, denominator = (g for g in fraction.groups() if g is not None)
        try:
            value = float(numerator) / float(denominator)
        except (ValueError, ZeroDivisionError, OverflowError):
            return None
        return _finite(value)
    if match is None:
        return None
    try:
        return _finite(float(match.group(0)))
    except (ValueError, OverflowError):
        return None


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
