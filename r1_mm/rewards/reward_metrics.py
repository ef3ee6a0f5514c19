"""Reward metrics of a batch of scored completions: per reward function, and per ``problem_type``.

Why: one mixed run (counting, MCQ, temporal questions) averages rewards of different tasks into one
number, which hides the task that improves and the one that does not; the same keys per problem
type show each. And a plugin reward's recipe name is its file path (``/home/me/x.py:fn``): as a
metric key its slashes split it into nested dashboard sections and the key changes with the machine,
so metric keys use the function's name (:func:`metric_labels`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from r1_mm.core.plugins import is_plugin_name

BY_TYPE = "by_type"


def metric_labels(names: Sequence[str]) -> list[str]:
    """The metric name of each reward: a registered name as is, a plugin (``file.py:fn``,
    ``pkg.mod:fn``) by its function name; a name met again (the same reward twice with other kwargs,
    or a plugin named like a built-in) gets ``_2``, ``_3``... in recipe order."""
    labels: list[str] = []
    for name in names:
        base = name.rsplit(":", 1)[1] if is_plugin_name(name) else name
        base = re.sub(r"[/\s]+", "_", base) or "reward"
        label, k = base, 1
        while label in labels:
            k += 1
            label = f"{base}_{k}"
        labels.append(label)
    return labels


def route_key(problem_type: Any) -> str:
    """A ``problem_type`` value as one metric-key segment (no slashes or spaces)."""
    return re.sub(r"[/\s]+", "_", str(problem_type).strip()) or "_"


def _mean(values: torch.Tensor) -> float | None:
    """Mean over the applicable (non-NaN) values; None when there are none."""
    present = ~torch.isnan(values)
    return float(values[present].mean()) if bool(present.any()) else None


def reward_metrics(per_function: torch.Tensor, total: torch.Tensor, labels: Sequence[str],
                   problem_types: Sequence[Any] | None = None, prefix: str = "rewards/") -> dict[str, float]:
    """``{prefix}total``, ``{prefix}<fn>/mean`` (NaN when the reward applied to none) and
    ``{prefix}<fn>/applicable`` over the batch; with ``problem_types`` (one per completion, None for
    rows without one), per problem type ``t`` present: ``{prefix}by_type/<t>/total``,
    ``{prefix}by_type/<t>/<fn>/mean`` (rewards that applied to that type) and
    ``{prefix}by_type/<t>/completions`` (how many completions of that type the batch held)."""
    out: dict[str, float] = {}
    overall = _mean(total)
    out[f"{prefix}total"] = float("nan") if overall is None else overall
    for j, label in enumerate(labels):
        mean = _mean(per_function[:, j])
        out[f"{prefix}{label}/mean"] = float("nan") if mean is None else mean
        out[f"{prefix}{label}/applicable"] = float((~torch.isnan(per_function[:, j])).float().mean())
    if problem_types is None:
        return out
    groups: dict[str, list[int]] = {}
    for i, kind in enumerate(problem_types):
        if kind is not None:
            groups.setdefault(route_key(kind), []).append(i)
    for route, indices in sorted(groups.items()):
        rows = torch.tensor(indices)
        key = f"{prefix}{BY_TYPE}/{route}/"
        out[f"{key}completions"] = float(len(indices))
        route_total = _mean(total[rows])
        if route_total is not None:
            out[f"{key}total"] = route_total
        for j, label in enumerate(labels):
            mean = _mean(per_function[rows, j])
            if mean is not None:
                out[f"{key}{label}/mean"] = mean
    return out
