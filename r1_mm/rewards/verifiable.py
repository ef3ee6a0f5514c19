"""Verifiable rewards that check an answer against the row's ``solution``.

Every reward takes TRL's keyword arguments and returns one ``float | None`` per completion: None when
the row has no solution (not applicable), 0.0 for a missing or unparsable answer.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from r1_mm.rewards.math_check import checker
from r1_mm.rewards.math_text import for_math_verify, reads_as_math
from r1_mm.rewards.parsing import first_number, normalise, score_each
from r1_mm.rewards.registry import reward


def answers_match(prediction: str, solution: str, timeout_seconds: float = 5.0) -> bool:
    """Normalised string equality; else, when the solution is mathematics (see
    :func:`~r1_mm.rewards.math_text.reads_as_math`), math-verify equivalence within a hard time limit.
    A worded solution ("front left", "chair") is compared as text only: symbolically, words are products
    of letters and would equal their anagrams and permutations."""
    if normalise(prediction) == normalise(solution):
        return True
    if not prediction.strip() or not solution.strip() or not reads_as_math(solution):
        return False
    return checker().equivalent(for_math_verify(prediction), for_math_verify(solution), timeout_seconds)


@reward("accuracy", needs=("solution",))
def accuracy(completions: list[Any], solution: list[Any] | None = None, *, tag: str = "answer",
             require_tag: bool = True, timeout_seconds: float = 5.0, **_: Any) -> list[float | None]:
    """1.0 when the tagged answer equals the solution as a string or as mathematics (LaTeX, numbers,
    expressions, via math-verify), else 0.0. Each math check is killed after ``timeout_seconds``."""
    return score_each("accuracy", completions, solution,
                       lambda a, s, _: answers_match(a, str(s), timeout_seconds), tag=tag, require_tag=require_tag)


def gold_and_prediction(answer: str, solution: Any) -> tuple[float, float | None]:
    """The first number of the solution (which must have one) and of the answer (None if it has none)."""
    gold = first_number(str(solution))
    if gold is None:
        raise ValueError(f"solution {solution!r} holds no number")
    return gold, first_number(answer)


@reward("numeric", needs=("solution",))
def numeric(completions: list[Any], solution: list[Any] | None = None, *, tag: str = "answer",
            require_tag: bool = True, abs_tol: float = 0.0, rel_tol: float = 0.0, **_: Any) -> list[float | None]:
    """1.0 when the answer's first number equals the solution's within ``abs_tol`` / ``rel_tol``."""

    def score(answer: str, sol: Any, _: int) -> float:
        gold, pred = gold_and_prediction(answer, sol)
        return float(pred is not None and abs(pred - gold) <= max(abs_tol, rel_tol * abs(gold)))

    return score_each("numeric", completions, solution, score, tag=tag, require_tag=require_tag)


@reward("relative_accuracy", needs=("solution",))
def relative_accuracy(completions: list[Any], solution: list[Any] | None = None, *, tag: str = "answer",
                      require_tag: bool = True, **_: Any) -> list[float | None]:
    """1 - |pred - gold| / |gold|, clipped to [0, 1]: Video-R1's reward for "regression" answers.

    Unlike VSI-Bench's MRA (a step function over ten thresholds) this is smooth in the error, so a
    group of near misses still gets distinct advantages."""

    def score(answer: str, sol: Any, _: int) -> float:
        gold, pred = gold_and_prediction(answer, sol)
        if pred is None:
            return 0.0
        return 1.0 - min(1.0, (abs(pred - gold) + 1e-9) / (abs(gold) + 1e-9))  # the 1e-9s are Video-R1's

    return score_each("relative_accuracy", completions, solution, score, tag=tag, require_tag=require_tag)


# -- VSI-Bench Mean Relative Accuracy -----------------------------------------------------------------

def vsi_parse_number(answer: str) -> float | None:
    """VSI-Bench's parsing: the first space-separated word, trailing '.' removed, through ``float``.

    So "3.5" and "3.5." parse, while "about 3.5" and "3.5m" do not (they score 0 there, and here).
    """
    word = answer.split(" ")[0].rstrip(".").strip()
    try:
        return float(word)
    except (ValueError, OverflowError):
        return None


_MRA_THRESHOLDS = np.linspace(0.5, 0.95, int((0.95 - 0.5) / 0.05 + 2))  # built the way VSI-Bench does: 10 points


def mean_relative_accuracy(pred: float, gold: float) -> float:
    """Mean over theta in {0.50, ..., 0.95} of 1[|pred - gold| / |gold| <= 1 - theta] (<=, as VSI-Bench).

    VSI-Bench divides by zero for gold = 0; here that case scores 1 for an exact 0 and 0 otherwise.
    """
    if gold == 0:
        return float(pred == 0)
    distance = abs(pred - gold) / abs(gold)
    return float((distance <= 1 - _MRA_THRESHOLDS).mean())


@reward("mra", needs=("solution",))
def mra(completions: list[Any], solution: list[Any] | None = None, *, tag: str = "answer",
        require_tag: bool = True, **_: Any) -> list[float | None]:
    """VSI-Bench Mean Relative Accuracy of a numeric answer (distances, sizes, counts); 0 if unparsable."""

    def score(answer: str, sol: Any, _: int) -> float:
        gold = float(sol) if isinstance(sol, (int, float)) else vsi_parse_number(str(sol).strip())
        if gold is None:
            raise ValueError(f"solution {sol!r} is not a number")
        pred = vsi_parse_number(answer)
        if pred is None or pred != pred or abs(pred) == float("inf"):
            return 0.0
        return mean_relative_accuracy(pred, gold)

    return score_each("mra", completions, solution, score, tag=tag, require_tag=require_tag)


# -- multiple choice and yes/no ------------------------------------------------------------------------

_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.*)$", re.DOTALL)
_LONE_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])")
_ONE_LETTER = re.compile(r"\(?([a-z])\)?", re.IGNORECASE)


def option_letters(options: list[Any] | None) -> dict[str, str]:
    """{"A": "circle", ...} from options written "A. circle" (or a bare list, lettered in order)."""
    out: dict[str, str] = {}
    for i, opt in enumerate(options or []):
        text = str(opt)
        m = _OPTION_PREFIX.match(text)
        if m:
            out[m.group(1)] = normalise(m.group(2))
        elif i < 26:
            out[chr(ord("A") + i)] = normalise(text)
    return out


def chosen_options(answer: str, options: dict[str, str]) -> set[str]:
    """Every option the answer names: by letter ("B", "(B)", "B. a dog") or by the option's text.

    An answer written as an option ("B. A dog") names that option only: capital letters inside an
    option's own text (the "A" of "A dog") are words, not choices, so option texts are removed before
    lone letters are counted."""
    valid = set(options) or {chr(ord("A") + i) for i in range(26)}
    said = normalise(answer)
    alone = _ONE_LETTER.fullmatch(said)
    if alone and alone.group(1).upper() in valid:  # "a", "(b)": the whole answer is one letter, in any case
        return {alone.group(1).upper()}
    prefixed = _OPTION_PREFIX.match(answer)
    if prefixed and prefixed.group(1) in valid:
        rest = normalise(prefixed.group(2))
        if not rest or rest == options.get(prefixed.group(1)) or rest in options.values():
            return {prefixed.group(1)}
    by_text = {letter for letter, text in options.items() if text and text == said}
    if by_text:
        return by_text
    remaining = answer
    for text in sorted((t for t in options.values() if t), key=len, reverse=True):
        remaining = re.sub(re.escape(text), " ", remaining, flags=re.IGNORECASE)
    return {m.group(1) for m in _LONE_LETTER.finditer(remaining) if m.group(1) in valid}


@reward("mcq", needs=("solution",))
def mcq(completions: list[Any], solution: list[Any] | None = None, options: list[Any] | None = None, *,
        tag: str = "answer", require_tag: bool = True, **_: Any) -> list[float | None]:
    """1.0 when the answer names exactly the correct option; naming several ("A or B") scores 0."""
    option_rows = options if options is not None else [None] * len(completions)

    def score(answer: str, sol: Any, i: int) -> float:
        table = option_letters(option_rows[i])
        gold = chosen_options(str(sol), table)
        if len(gold) != 1:
            raise ValueError(f"solution {sol!r} does not name exactly one option")
        return float(chosen_options(answer, table) == gold)

    return score_each("mcq", completions, solution, score, tag=tag, require_tag=require_tag)


_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


@reward("yes_no", needs=("solution",))
def yes_no(completions: list[Any], solution: list[Any] | None = None, *, tag: str = "answer",
           require_tag: bool = True, **_: Any) -> list[float | None]:
    """1.0 when the answer says only the correct one of yes / no; saying both or neither scores 0."""

    def score(answer: str, sol: Any, _: int) -> float:
        gold = {w.lower() for w in _YES_NO.findall(str(sol))}
        if len(gold) != 1:
            raise ValueError(f"solution {sol!r} is not yes or no")
        return float({w.lower() for w in _YES_NO.findall(answer)} == gold)

    return score_each("yes_no", completions, solution, score, tag=tag, require_tag=require_tag)
