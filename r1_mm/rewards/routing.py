"""``by_problem_type``: one run mixes counting, MCQ, numeric and temporal questions, each row scored by
the reward its ``problem_type`` column names."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from r1_mm.rewards.parsing import RowError, require_column
from r1_mm.rewards.registry import call_reward, get, reward

DEFAULT_ROUTES: dict[str, str] = {
    "mcq": "mcq", "multiple_choice": "mcq", "multiple choice": "mcq",
    "numeric": "numeric", "numerical": "numeric", "counting": "numeric",
    "regression": "mra", "mra": "mra", "distance": "mra", "size": "mra",
    "temporal": "temporal_iou", "grounding": "bbox_iou", "bbox": "bbox_iou",
    "yes_no": "yes_no", "ocr": "ocr", "free_form": "free_form", "free-form": "free_form", "math": "accuracy",
}


@reward("by_problem_type")
def by_problem_type(completions: list[Any], problem_type: list[Any] | None = None, *,
                    routes: dict[str, str] | None = None, reward_kwargs: dict[str, dict[str, Any]] | None = None,
                    **columns: Any) -> list[float | None]:
    """Score each row with ``routes[problem_type]`` (defaults: :data:`DEFAULT_ROUTES`, extended or
    overridden by ``routes``); ``reward_kwargs`` holds per-reward keyword arguments."""
    types = require_column("by_problem_type", "problem_type", problem_type)
    table = {**DEFAULT_ROUTES, **(routes or {})}
    by_reward: dict[str, list[int]] = {}
    for i, kind in enumerate(types):
        if kind not in table:
            raise RowError(i, f"problem_type {kind!r} has no reward; known: {', '.join(sorted(table))} "
                              "(add it under the reward's kwargs.routes)")
        by_reward.setdefault(table[kind], []).append(i)
    out: list[float | None] = [None] * len(completions)
    for name, indices in by_reward.items():
        subset = {k: [v[i] for i in indices] for k, v in columns.items()
                  if isinstance(v, list) and len(v) == len(types)}
        extras = {k: v for k, v in columns.items() if k not in subset}
        try:
            values = call_reward(get(name), completions=[completions[i] for i in indices],
                                 problem_type=[types[i] for i in indices], **subset, **extras,
                                 **(reward_kwargs or {}).get(name, {}))
        except RowError as exc:
            raise RowError(indices[exc.index], f"{name}: {exc}") from exc
        for i, v in zip(indices, values, strict=True):
            out[i] = v
    return out


def _routed(kwargs: dict[str, Any]) -> dict[str, str]:
    return {**DEFAULT_ROUTES, **(kwargs.get("routes") or {})}


def _needs_for(kwargs: dict[str, Any]) -> set[str]:
    """problem_type, and what every reward a problem type can route to needs."""
    from r1_mm.rewards.signature import needed_columns

    out = {"problem_type"}
    for name in set(_routed(kwargs).values()):
        out |= needed_columns(get(name), (kwargs.get("reward_kwargs") or {}).get(name, {}))
    return out


def _nested_specs(kwargs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(reward, its kwargs) for every route and reward_kwargs entry, so their options are checked too."""
    extra = kwargs.get("reward_kwargs") or {}
    return [(name, dict(extra.get(name, {}))) for name in sorted(set(_routed(kwargs).values()) | set(extra))]


def _row_problems(rows: list[dict[str, Any]], kwargs: dict[str, Any]) -> list[str]:
    """The first row whose problem_type has no route (rows without the column are reported as missing
    columns, by the input checks): found when the data loads, not when a batch first draws it."""
    table = _routed(kwargs)
    unrouted = [i for i, r in enumerate(rows) if "problem_type" in r
                and (not isinstance(r["problem_type"], Hashable) or r["problem_type"] not in table)]
    if not unrouted:
        return []
    first = unrouted[0]
    kinds = sorted({repr(rows[i]["problem_type"]) for i in unrouted})
    more = f" ({len(unrouted) - 1} more row(s); unrouted types: {', '.join(kinds)})" if len(unrouted) > 1 else ""
    return [f"row {first} (id {rows[first].get('id', first)}): problem_type {rows[first]['problem_type']!r} has no "
            f"reward{more}; routed types: {', '.join(sorted(table))}; add it under the reward's kwargs.routes"]


by_problem_type.needs_for = _needs_for
by_problem_type.nested_specs = _nested_specs
by_problem_type.row_problems = _row_problems
