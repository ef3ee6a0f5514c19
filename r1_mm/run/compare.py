"""When did a run reach a target? ``r1-mm compare RUN ... --metric M --threshold T``: the first step at which the
trailing mean of a metric over ``window`` steps reaches the threshold, and the wall-clock seconds of training up to
that step, per run, as a markdown table (with the runs' curves side by side in a PNG).

Why a trailing mean and not one step's value: the demo's accuracy is the mean of 64 completions per step, so a
single step reaches 0.8 by chance long before the policy does (the counting demo's 10-step mean first reached 0.8
at step 695, its 20-step mean at step 780). Claims such as "SFT cold start reaches 0.8 in fewer GRPO steps" and
"max_staleness 1 reaches 0.8 within 25% of the synchronous run's steps" are read off this table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1_mm.run.tracking import read_metrics


@dataclass(frozen=True)
class Reached:
    """One run against a target: ``step`` (1-based count of steps trained when the trailing mean first reached the
    threshold) and ``seconds`` (wall clock from the first step's start to that step's end), None if never."""

    label: str
    steps_run: int
    seconds_run: float
    step: int | None
    seconds: float | None
    best_mean: float | None


def training_seconds(rows: Sequence[Mapping[str, Any]], index: int) -> float:
    """Wall-clock seconds from the start of the first logged step to the end of step ``index``: the tracker's
    ``time`` (seconds since the tracker started) minus where the first step began, so start-up (model load,
    server start) is left out for every run alike."""
    first = rows[0]
    start = float(first.get("time", 0.0)) - float(first.get("time/step_s", 0.0))
    return float(rows[index].get("time", 0.0)) - start


def first_reached(rows: Sequence[Mapping[str, Any]], metric: str, threshold: float,
                  window: int) -> tuple[int | None, float | None]:
    """The index of the first row whose trailing mean of ``metric`` over ``window`` rows that log it is at least
    ``threshold`` (None if none), and the best trailing mean of the whole run (None if fewer than ``window`` rows
    log it)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    logged = [(i, float(r[metric])) for i, r in enumerate(rows) if isinstance(r.get(metric), (int, float))]
    first, best = None, None
    for end in range(window, len(logged) + 1):
        mean = sum(v for _, v in logged[end - window:end]) / window
        best = mean if best is None else max(best, mean)
        if first is None and mean >= threshold:
            first = logged[end - 1][0]
    return first, best


def reached(label: str, run_dir: str | Path, metric: str, threshold: float, window: int) -> Reached:
    """``first_reached`` on a run folder's metrics.jsonl (a ValueError naming the run if it has no rows or never
    logs ``metric``)."""
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}: metrics.jsonl has no rows")
    if not any(metric in r for r in rows):
        raise ValueError(f"{run_dir}: no row logs {metric!r}")
    index, best = first_reached(rows, metric, threshold, window)
    return Reached(label=label, steps_run=len(rows), seconds_run=training_seconds(rows, len(rows) - 1),
                   step=None if index is None else int(rows[index].get("step", index)) + 1,
                   seconds=None if index is None else training_seconds(rows, index), best_mean=best)


def table(results: Sequence[Reached], metric: str, threshold: float, window: int) -> str:
    """A markdown table of ``reached`` results, the first run being the reference for the ratios."""
    head = (f"{metric}: trailing mean over {window} steps >= {threshold}\n\n"
            "| run | steps run | s run | steps to target | s to target | steps / first run's | best trailing mean |\n"
            "|---|---|---|---|---|---|---|")
    ref = results[0].step if results else None
    lines = [head]
    for r in results:
        ratio = f"{r.step / ref:.2f}" if r.step and ref else "-"
        lines.append(f"| {r.label} | {r.steps_run} | {r.seconds_run:.1f} | {r.step if r.step else 'not reached'} | "
                     f"{f'{r.seconds:.1f}' if r.seconds is not None else '-'} | {ratio} | "
                     f"{f'{r.best_mean:.3f}' if r.best_mean is not None else '-'} |")
    return "\n".join(lines)
