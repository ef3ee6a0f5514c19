"""Which answers are mathematics, and how they are written for math-verify.

math-verify reads ``$...$`` as LaTeX, where letters are variables multiplied together: inside dollars
"left" is l*e*f*t, equal to "felt", and "front left" equals "left front". Spatial-reasoning answers
(directions, object names, yes/no) are words, so wrapping every answer in dollars made words equal
their anagrams. Here an answer is one of three forms:

- mathematics: its words are single letters (variables, option letters), function names (sin, log,
  sqrt, ...) or letters right after a coefficient ("2xy"); LaTeX commands and ``\\text{}`` do not count;
- a quantity: a number with unit words only ("5 cm", "28 percent", "3 meters");
- text: anything else ("left", "front left", "no", "red cube", "chair 2").
"""

from __future__ import annotations

import re

MATH_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")
MATH_WORDS = frozenset({
    "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
    "log", "ln", "lg", "exp", "sqrt", "pi", "inf", "infty", "oo", "mod", "gcd", "lcm", "min", "max", "deg",
})
UNIT_WORDS = frozenset({
    "mm", "cm", "km", "in", "inch", "inches", "ft", "foot", "feet", "yd", "yard", "yards", "mile", "miles",
    "meter", "meters", "metre", "metres", "millimeter", "millimeters", "centimeter", "centimeters",
    "kilometer", "kilometers", "kg", "gram", "grams", "lb", "lbs", "pound", "pounds", "sec", "second",
    "seconds", "minute", "minutes", "hr", "hour", "hours", "day", "days", "week", "weeks", "month", "months",
    "year", "years", "degree", "degrees", "percent", "pct", "unit", "units", "sq", "square", "cubic",
})
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textnormal|textit|mathrm|mathbf|mbox|operatorname)\s*\{[^{}]*\}")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[^\W\d_]+")


def is_delimited(text: str) -> bool:
    """Does the text already mark its mathematics ($...$, \\(...\\), \\[...\\], \\boxed{...})?"""
    return any(d in text for d in MATH_DELIMITERS)


def _words(text: str) -> list[str]:
    """The words that are not mathematics: LaTeX commands, ``\\text{}`` contents (units), single letters,
    function names and letters right after a digit ("2xy") left out; lower-cased."""
    bare = _COMMAND.sub(" ", _TEXT_COMMAND.sub(" ", text))
    out = []
    for word in _WORD.finditer(bare):
        coefficient = word.start() > 0 and bare[word.start() - 1].isdigit()
        if len(word.group()) > 1 and word.group().lower() not in MATH_WORDS and not coefficient:
            out.append(word.group().lower())
    return out


def is_quantity(text: str) -> bool:
    """A number with unit words only: "5 cm", "28 percent", "3.5 meters"."""
    words = _words(text)
    return bool(words) and any(c.isdigit() for c in text) and all(w in UNIT_WORDS for w in words)


def reads_as_math(text: str) -> bool:
    """True for "3.5", "7/2", "\\frac{1}{2}", "2x+2", "x = 2", "[0, 1)", "B", "5 \\text{cm}", "5 cm" or
    anything in math delimiters; False for words: "left", "front left", "no", "red cube", "chair 2"."""
    return is_delimited(text) or not _words(text) or is_quantity(text)


def for_math_verify(text: str) -> str:
    """The answer as math-verify should read it. Delimited text as it is. Bare mathematics in dollars:
    undelimited, math-verify takes the first number, so "2^{10}" would be 2; a final full stop is
    dropped ("6/3." in dollars does not parse). Quantities and text as they are: math-verify's own
    extraction finds the number in "5 cm" and "The answer is 4" (as R1-V and VLM-R1 use it), and
    nothing in "front left"; inside dollars "cm" would be c*m."""
    text = text.strip()
    if is_delimited(text) or _words(text):
        return text
    return f"${text.rstrip('.').strip()}$"
