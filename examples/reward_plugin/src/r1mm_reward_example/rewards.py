"""Rewards that prefer answers of a target length.

A reward is any callable taking keyword arguments (prompts, completions, completion_ids and every
dataset column) and returning one float or None per completion. This module does not import r1-mm:
the entry point in pyproject.toml is what registers it.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _answer(completion: Any) -> str:
    text = completion if isinstance(completion, str) else completion[-1]["content"]
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else text.strip()


def answer_length(completions: list[Any], target_chars: int = 1, **kwargs: Any) -> list[float | None]:
    """1.0 for an answer of exactly ``target_chars`` characters, falling off linearly to 0.

    Rows whose ``problem_type`` is ``free_form`` get None: length says nothing about them.
    """
    kinds = kwargs.get("problem_type") or [None] * len(completions)
    out: list[float | None] = []
    for completion, kind in zip(completions, kinds):
        if kind == "free_form":
            out.append(None)
            continue
        length = len(_answer(completion))
        out.append(max(0.0, 1.0 - abs(length - target_chars) / max(target_chars, 1)))
    return out


async def async_answer_length(completions: list[Any], **kwargs: Any) -> list[float | None]:
    """The same reward written as a coroutine (as one that calls a remote service would be)."""
    await asyncio.sleep(0)
    return answer_length(completions, **kwargs)
