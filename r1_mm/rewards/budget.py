"""The time left for the current batch of rewards, for code that can stop early on its own.

The runner gives each batch a deadline (``rewards.batch_timeout_s``) and kills or abandons a reward
still running at it. A reward made of many small checks (``accuracy``: one math-verify call per
completion) does better by skipping the checks that no longer fit, so that it returns in time with
real values for the rest: it asks :func:`clip` for each check's limit. The deadline travels in a
context variable (a thread or a worker process of the runner sets it for its call).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("r1mm_reward_deadline", default=None)


def clip(seconds: float) -> float:
    """``seconds``, or less when the batch's deadline comes sooner (<= 0: no time left)."""
    deadline = _deadline.get()
    if deadline is None:
        return seconds
    return min(seconds, deadline - time.monotonic())


@contextlib.contextmanager
def until(deadline: float | None) -> Iterator[None]:
    """Run the block with ``deadline`` (a ``time.monotonic()`` value; None = none) as the batch's deadline."""
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)
