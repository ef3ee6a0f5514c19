"""Verifiable rewards: answers checked against the row's ``solution``.

Every reward takes TRL's keyword arguments and returns one ``float | None`` per completion.
"""

from __future__ import annotations

import re
from typing import Any

from r1_mm.rewards.registry import reward

_TAG_CACHE: dict[str, re.Pattern[str]] = {}


def _tag_pattern(tag: str) -> re.Pattern[str]:
    if tag not in _TAG_CACHE:
        _TAG_CACHE[tag] = re.compile(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", re.DOTALL)
    return _TAG_CACHE[tag]


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
    """The content of the last ``<tag>...</tag>``, stripped; None when there is none."""
    found = _tag_pattern(tag).findall(text)
    return found[-1].strip() if found else None


def _normalise(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().strip(".").lower())


def answers_match(prediction: str, solution: str, timeout_seconds: int = 5) -> bool:
    """Normalised string equality, else math-verify equivalence (bounded by ``timeout_seconds``)."""
    if _normalise(prediction) == _normalise(solution):
        return True
    from math_verify import parse, verify

    try:
        gold = parse(solution, parsing_timeout=timeout_seconds)
        pred = parse(prediction, parsing_timeout=timeout_seconds)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout_seconds))
    except Exception:  # math-verify raises on pathological input; that is a wrong answer, not a crash
        return False


@reward("accuracy")
def accuracy(completions: list[Any], solution: list[Any] | None = None, *, tag: str = "answer",
             require_tag: bool = True, timeout_seconds: int = 5, **_: Any) -> list[float | None]:
    """1.0 when the tagged answer equals the solution (string or math equivalence), else 0.0.

    With ``require_tag=False`` an untagged completion is compared as a whole. Rows without a
    solution get None.
    """
    if solution is None:
        raise KeyError("reward 'accuracy' needs a 'solution' column")
    out: list[float | None] = []
    for completion, sol in zip(completions, solution, strict=True):
        if sol is None:
            out.append(None)
            continue
        text = completion_text(completion)
        answer = extract_answer(text, tag)
        if answer is None:
            answer = None if require_tag else text
        out.append(float(answer is not None and answers_match(answer, str(sol), timeout_seconds)))
    return out


@reward("format")
def format_reward(completions: list[Any], *, think_tag: str = "think", answer_tag: str = "answer",
                  require_think: bool = True, pattern: str | None = None, **_: Any) -> list[float]:
    """1.0 for exactly ``<think>...</think><answer>...</answer>`` (whitespace between allowed).

    ``pattern``: a regular expression the whole (stripped) completion must match instead, e.g.
    ``"\\d+"`` for a bare number.
    """
    if pattern is not None:
        custom = re.compile(pattern, re.DOTALL)
        return [1.0 if custom.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]
    think = rf"<{re.escape(think_tag)}>.*?</{re.escape(think_tag)}>\s*" if require_think else ""
    tagged = re.compile(rf"^\s*{think}<{re.escape(answer_tag)}>.*?</{re.escape(answer_tag)}>\s*$", re.DOTALL)
    return [1.0 if tagged.match(completion_text(c)) else 0.0 for c in completions]


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def first_number(text: str) -> float | None:
    """The first number written in ``text`` (commas as thousands separators allowed), else None."""
    match = _NUMBER.search(text.replace(",", ""))
    if match is None:
        return None
    try:
        return float(match.group(0))
    except ValueError:
        return None


@reward("numeric")
def numeric(completions: list[Any], solution: list[Any] | None = None, *, tag: str = "answer",
            require_tag: bool = True, abs_tol: float = 0.0, rel_tol: float = 0.0, **_: Any) -> list[float | None]:
    """1.0 when the first number of the answer equals the solution within tolerance, else 0.0."""
    if solution is None:
        raise KeyError("reward 'numeric' needs a 'solution' column")
    out: list[float | None] = []
    for completion, sol in zip(completions, solution, strict=True):
        gold = first_number(str(sol)) if sol is not None else None
        if gold is None:
            out.append(None)
            continue
        text = completion_text(completion)
        answer = extract_answer(text, tag)
        if answer is None and not require_tag:
            answer = text
        pred = first_number(answer) if answer is not None else None
        ok = pred is not None and abs(pred - gold) <= max(abs_tol, rel_tol * abs(gold))
        out.append(float(ok))
    return out
