"""``r1-mm rewards check``: try a reward on a few real rows before a run depends on it.

It reports problems in plain words (a signature that cannot take the protocol's keyword arguments,
a needed column the data lacks, wrong return values) instead of a traceback mid-training.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1_mm.config.recipe import DataConfig, RewardSpec
from r1_mm.data.loading import map_columns, read_rows
from r1_mm.data.prompts import build_messages, row_id
from r1_mm.rewards.registry import RewardError, get
from r1_mm.rewards.runner import RewardRunner
from r1_mm.rewards.signature import PROTOCOL_ARGUMENTS
from r1_mm.run.context import RunContext


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def signature_problems(fn: Any, columns: set[str], fixed: set[str]) -> list[str]:
    """What stops ``fn`` from being called as fn(prompts=, completions=, completion_ids=, **columns)."""
    if not callable(fn):
        return [f"it is a {type(fn).__name__}, not a function"]
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []
    problems = []
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for p in params:
        if p.kind is p.POSITIONAL_ONLY:
            problems.append(f"argument '{p.name}' is positional-only, but rewards are called with keywords only")
        elif p.kind is p.VAR_POSITIONAL:
            continue
        elif (p.default is p.empty and p.kind is not p.VAR_KEYWORD and p.name not in PROTOCOL_ARGUMENTS
              and p.name not in columns and p.name not in fixed):
            problems.append(f"it needs argument '{p.name}', which is neither a reward argument "
                            f"({', '.join(PROTOCOL_ARGUMENTS)}) nor a column of the data "
                            f"({', '.join(sorted(columns))}) nor set in the recipe kwargs")
    if not takes_any:
        if "completions" not in names:
            problems.append("it has no 'completions' argument (nor **kwargs), so it cannot see what to score")
        unexpected = sorted((set(PROTOCOL_ARGUMENTS) | columns) - names)
        if unexpected:
            problems.append(f"it has no **kwargs, but it is also called with {', '.join(unexpected)}; "
                            "add **kwargs to its signature")
    return problems


def check_reward(name: str, data: str | Path, *, rows: int = 4, kwargs: dict[str, Any] | None = None,
                 columns: dict[str, str] | None = None) -> CheckReport:
    """``columns``: the recipe's data.columns (source column -> r1-mm column), applied as training does."""
    from r1_mm.run.input_checks import spec_problems

    report = CheckReport()
    try:
        fn = get(name)
    except RewardError as exc:
        report.problems.append(str(exc))
        return report
    report.lines.append(f"reward {name!r}: {getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)}")
    # the recipe's kwargs are checked as a training run checks them (a misspelt option is not swallowed)
    report.problems += spec_problems(RewardSpec(name=name, kwargs=dict(kwargs or {})), f"reward '{name}'")[0]
    cfg = DataConfig(columns=dict(columns or {}))
    table = map_columns(read_rows(data)[:rows], cfg, str(data))
    if not table:
        report.problems.append(f"{data} has no rows")
        return report
    report.problems += signature_problems(fn, {k for r in table for k in r}, set(kwargs or {}))
    if report.problems:
        return report
    runner = RewardRunner([RewardSpec(name=name, kwargs=dict(kwargs or {}))], on_error="raise")
    prompts, completions, ids, sample_rows, row_ids, kinds = [], [], [], [], [], []
    for i, row in enumerate(table):
        solution = row.get("solution")
        for kind, text in (("solution", f"<think>...</think><answer>{solution}</answer>"), ("empty", "")):
            prompts.append(build_messages(row, i, cfg))
            completions.append(text)
            ids.append([])
            sample_rows.append(row)
            row_ids.append(row_id(row, i))
            kinds.append(kind)
    with RunContext(None) as run:  # the reward's worker process killed however the check ends
        run.on_close(runner.close)
        try:
            batch = runner(prompts=prompts, completions=completions, completion_ids=ids, rows=sample_rows,
                           row_ids=row_ids)
        except RewardError as exc:
            report.problems.append(str(exc))
            return report
    for rid, kind, value in zip(row_ids, kinds, batch.per_function[:, 0].tolist(), strict=True):
        shown = "None" if value != value else f"{value:.3f}"
        report.lines.append(f"  row {rid:<20} completion={kind:<9} reward={shown}")
    return report
