"""Which answers are mathematics, and how they are written for math-verify.

math-verify reads ``$...$`` as LaTeX, where letters are variables multiplied together: inside dollars
"left" is l*e*f*t, equal to "felt", and "front left" equals "left front". Spatial-reasoning answers
(directions, object names, yes/no) are words, so wrapping every answer in dollars made words equal
their anagrams. Here an answer counts as mathematics only when its words are single letters (variables,
option letters), function names (sin, log, sqrt, ...) or letters right after a coefficient ("2xy");
anything else is text, compared as text.
"""

from __future__ import annotations

import re

MATH_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")
MATH_WORDS = frozenset({
    "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
    "log", "ln", "lg", "exp", "sqrt", "pi", "inf", "infty", "oo", "mod", "gcd", "lcm", "min", "max", "deg",
})
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textnormal|textit|mathrm|mathbf|mbox|operatorname)\s*\{[^{}]*\}")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[^\W\d_]+")


def is_delimited(text: str) -> bool:
    """Does the text already mark its mathematics ($...$, \\(...\\), \\[...\\], \\boxed{...})?"""
    return any(d in text for d in MATH_DELIMITERS)


def reads_as_math(text: str) -> bool:
    """True for answers such as "3.5", "7/2", "\\frac{1}{2}", "2x+2", "x = 2", "[0, 1)", "B", "5 \\text{cm}"
    or anything in math delimiters; False for words: "left", "front left", "no", "red cube", "chair 2".

    LaTeX commands and the words inside ``\\text{}`` (units) are not counted as words."""
    if is_delimited(text):
        return True
    bare = _COMMAND.sub(" ", _TEXT_COMMAND.sub(" ", text))
    for word in _WORD.finditer(bare):
        coefficient = word.start() > 0 and bare[word.start() - 1].isdigit()
        if len(word.group()) > 1 and word.group().lower() not in MATH_WORDS and not coefficient:
            return False
    return True


def for_math_verify(text: str) -> str:
    """The answer as math-verify should read it. Delimited text as it is. Bare mathematics in dollars:
    undelimited, math-verify takes the first number, so "2^{10}" would be 2; a final full stop is
    dropped ("6/3." in dollars does not parse). Text as it is, so math-verify's own extraction finds
    a number in "The answer is 4" (as R1-V and VLM-R1 use it) and nothing in "front left"."""
    text = text.strip()
    if is_delimited(text) or not reads_as_math(text):
        return text
    return f"${text.rstrip('.').strip()}$"
