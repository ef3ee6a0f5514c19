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


def boxed_content(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), None when there is none or it is
    unclosed. One forward scan from the last ``\\boxed{``: linear in the text."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed{"), len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[start + len("\\boxed{"):i].strip()
            depth -= 1
    return None


# Possessive quantifiers (*+, ++, ?+) never give back what they matched: without them a long run of
# digits or spaces that is not a fraction or power made the search quadratic (10 s on 5000 digits).
_SIGNED = r"[-+]?+(?:\d++(?:\.\d*+)?+|\.\d++)"
_NUMBER = _SIGNED + r"(?:[eE][-+]?+\d++)?+"
_FRAC_ARG = rf"(?:\{{\s*+({_SIGNED})\s*+\}}|(\d))"  # \frac{7}{2}, and TeX's shorthand \frac72 (one digit each)
_POWER = r"\s*+\^\s*+(?:\{\s*+([-+]?+\d++(?:\.\d++)?+)\s*+\}|([-+]?+\d++))"  # ^{10}, ^10 (10, as math-verify reads it)
# One numeric term; at a given position the alternatives are tried in this order, so "2^{10}" is a power
# and not the number 2, and "-\frac{1}{2}" keeps its sign.
TERM = re.compile(
    rf"(?P<frac>(?:([-+])\s*+)?\\[dtc]?frac\s*+{_FRAC_ARG}\s*+{_FRAC_ARG})"
    rf"|(?P<sci>({_SIGNED})\s*+(?:\\times|\\cdot|×|\*)\s*+10{_POWER})"
    rf"|(?P<pow>({_NUMBER}){_POWER})"
    r"|(?P<slash>(?<![\d.])([-+]?+\d++(?:\.\d++)?+)\s*+/\s*+(\d++(?:\.\d++)?+)(?![\d/]|\.\d))"  # not 1/2/2020
    rf"|(?P<num>{_NUMBER})")


def _finite(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


def _term_value(match: re.Match[str]) -> float:
    """The value of a :data:`TERM` match (raises ValueError, ZeroDivisionError or OverflowError)."""
    g = match.groups()
    if match.group("frac") is not None:  # groups 2..6: sign, numerator {..} or digit, denominator {..} or digit
        sign = -1.0 if g[1] == "-" else 1.0
        return sign * float(g[2] or g[3]) / float(g[4] or g[5])
    if match.group("sci") is not None:  # groups 8..10: mantissa, exponent {..} or bare
        return float(g[7]) * 10.0 ** float(g[8] or g[9])
    if match.group("pow") is not None:  # groups 12..14: base, exponent {..} or bare; -2^2 is -(2^2)
        base = float(g[11])
        return (-1.0 if base < 0 else 1.0) * abs(base) ** float(g[12] or g[13])
    if match.group("slash") is not None:  # groups 16..17: numerator, denominator
        return float(g[15]) / float(g[16])
    return float(match.group("num"))


def first_number(text: str) -> float | None:
    """The value of the first number written in ``text``, or of the last ``\\boxed{}`` when there is one;
    None when there is none. Commas are thousands separators; a fraction (``3/4``, ``\\frac{3}{4}``,
    ``-\\frac{3}{4}``, ``\\frac34``) is its value, a power (``2^{10}``, ``3 \\times 10^{5}``) too, not
    its first digits."""
    boxed = boxed_content(text)
    text = (text if boxed is None else boxed).replace(",", "")
    match = TERM.search(text)
    if match is None:
        return None
    try:
        value = _term_value(match)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return _finite(value)


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
