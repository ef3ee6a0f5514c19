"""What a reward function asks for, read from its signature: the columns every row must carry for it.

The reward runner passes the protocol arguments and the rows' columns; the load checks
(:mod:`r1_mm.run.input_checks`) and the router (:mod:`r1_mm.rewards.routing`) both need to know which
columns a reward requires, so the rule is written once, here, below both.
"""

from __future__ import annotations

import inspect
from typing import Any

PROTOCOL_ARGUMENTS = ("prompts", "completions", "completion_ids")
# arguments the runner always passes besides the rows' columns and the run context
PASSED_BY_RUNNER = (*PROTOCOL_ARGUMENTS, "prompt_media", "max_completion_length")


def needed_columns(fn: Any, kwargs: dict[str, Any]) -> set[str]:
    """Columns every row must carry for ``fn``: its declared ``needs`` (built-ins; ``needs_for(kwargs)``
    when they depend on the options), else the parameters it requires without a default."""
    if callable(getattr(fn, "needs_for", None)):
        return set(fn.needs_for(kwargs))
    if getattr(fn, "needs", None) is not None:
        return set(fn.needs)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in PASSED_BY_RUNNER and p.name not in kwargs}
