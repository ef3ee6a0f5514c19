"""What a reward function asks for, read from its signature: the keywords it takes and the columns
every row must carry for it.

The reward runner passes the protocol arguments, the run context and the rows' columns; the runner
(which keywords to pass), the load checks (:mod:`r1_mm.run.input_checks`: misspelt options, missing
columns) and the router (:mod:`r1_mm.rewards.routing`) all read signatures, so the reading is written
once, here, below them.
"""

from __future__ import annotations

import inspect
from typing import Any

PROTOCOL_ARGUMENTS = ("prompts", "completions", "completion_ids")
# arguments the runner always passes besides the rows' columns and the run context
PASSED_BY_RUNNER = (*PROTOCOL_ARGUMENTS, "prompt_media", "max_completion_length", "trajectories")


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


def accepts_keyword(fn: Any, name: str) -> bool:
    """Does ``fn`` take ``name`` as a keyword (by name or through ``**kwargs``)?"""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == name and p.kind is not p.POSITIONAL_ONLY) for p in params)


def explicit_parameters(fn: Any) -> set[str] | None:
    """Names a reward takes as keywords; None when its signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
