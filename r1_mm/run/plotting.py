"""Training curves from a run's ``metrics.jsonl`` to a PNG (``r1-mm plot RUN_DIR [--metrics a,b]``).

Each panel shows the logged values as points and, over them, a trailing moving average. The window
is at most a tenth of the series (``smoothing_window``): a 20-step window on a 30-step run would
flatten it, and a short run would look steadier than it was.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from r1_mm.core.registry import suggest
from r1_mm.run.tracking import read_metrics

# "rewards": every reward function's mean (rewards/<fn>/mean), one curve each
DEFAULT_PANELS = ("rewards", "train/kl", "completions/mean_length", "train/entropy")
MAX_COLUMNS = 4


class UnknownMetricError(ValueError):
    """A panel names no metric of the run."""


def smoothing_window(requested: int, points: int) -> int:
    """The moving-average window: ``requested``, but never wider than a tenth of the series."""
    return max(1, min(requested, points // 10))


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: each point is the mean of itself and the ``window - 1`` before it."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / min(i + 1, window) for i in range(len(values))]


def metric_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every numeric metric of the run, in order of first appearance (per-type rewards appear only
    in steps that had that problem type, so the first row does not list them all)."""
    seen: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "time") and _number(value) is not None:
                seen.setdefault(key, None)
    return list(seen)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("nan", "inf", "-inf"):  # how metrics.jsonl stores non-finite floats
        return float(value)
    return None


def panel_keys(panel: str, names: Sequence[str]) -> list[str]:
    """The metrics a panel draws: ``rewards`` (each rewards/<fn>/mean), an exact name, or a glob
    pattern (``rewards/by_type/*/total``); UnknownMetricError with the closest name otherwise."""
    if panel == "rewards":
        keys = [k for k in names if k.startswith("rewards/") and k.endswith("/mean") and k.count("/") == 2]
    elif panel in names:
        keys = [panel]
    else:
        keys = [k for k in names if fnmatch.fnmatchcase(k, panel)]
    if keys:
        return keys
    hint = suggest(panel, names, listing=None) or f" ({len(names)} metrics; e.g. {', '.join(names[:5])})"
    raise UnknownMetricError(f"metric '{panel}' is not in this run's metrics.jsonl{hint}")


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and finite values of one metric (steps without it, or with NaN, are left out)."""
    steps, values = [], []
    for row in rows:
        v = _number(row.get(key))
        if v is not None and math.isfinite(v):
            steps.append(row["step"])
            values.append(v)
    return steps, values


def chosen_panels(panels: Sequence[str] | None, names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(panel, its metrics) for each panel asked for, each checked; without ``panels``, the default
    panels this run has (a DPO run logs no entropy)."""
    if panels:
        return [(panel, panel_keys(panel, names)) for panel in panels]
    found = []
    for panel in DEFAULT_PANELS:
        try:
            found.append((panel, panel_keys(panel, names)))
        except UnknownMetricError:
            continue
    return found or [(names[0], [names[0]])]


def draw_run(run_dir: str | Path, *, smooth_window: int = 20, panels: Sequence[str] | None = None) -> Any:
    """The figure: one panel per entry of ``panels`` (default: :data:`DEFAULT_PANELS`). Per metric two
    lines, named by their ``gid`` (tests read them): ``raw:<key>``, the logged points, and
    ``smooth:<key>``, their moving average drawn over them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no rows")
    chosen = chosen_panels(panels, metric_names(rows))  # every name checked before anything is drawn
    columns = min(MAX_COLUMNS, len(chosen))
    lines = -(-len(chosen) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.4 * lines), squeeze=False)
    for ax in axes.flat[len(chosen):]:
        ax.set_visible(False)
    for ax, (panel, keys) in zip(axes.flat, chosen, strict=False):
        windows = set()
        for n, key in enumerate(keys):
            steps, values = series(rows, key)
            window = smoothing_window(smooth_window, len(values))
            windows.add(window)
            colour = f"C{n % 10}"
            ax.plot(steps, values, linestyle="none", marker="o", markersize=2.5, alpha=0.35, color=colour,
                    zorder=1, gid=f"raw:{key}")
            label = key.replace("rewards/", "").replace("/mean", "") if panel == "rewards" else key
            ax.plot(steps, smooth(values, window), color=colour, linewidth=1.6, zorder=2, label=label,
                    gid=f"smooth:{key}")
        shown = max(windows) if windows else 1
        ax.set_title(panel + (f" (mean of {shown})" if shown > 1 else ""), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if keys != [panel]:  # a group or a glob: which curve is which
            ax.legend(fontsize=7)
    minutes = rows[-1].get("time", 0.0) / 60
    fig.suptitle(f"{run_dir.name}: {len(rows)} logged steps, {minutes:.1f} min")
    fig.tight_layout()
    return fig


def plot_run(run_dir: str | Path, out: str | Path | None = None, *, smooth: int = 20,
             panels: Sequence[str] | None = None) -> Path:
    """Draw ``panels`` (see :func:`draw_run`) to ``out`` (default RUN_DIR/curves.png)."""
    import matplotlib.pyplot as plt

    fig = draw_run(run_dir, smooth_window=smooth, panels=panels)
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_comparison(runs: dict[str, str | Path], out: str | Path, panels: Sequence[str], *,
                    smooth: int = 20) -> Path:
    """Several runs on the same panels, one colour per run (``runs``: label -> run folder): an ablation's curves
    side by side (the zoom-in demo: GRPO with tools and without). A panel a run does not log is left out for it;
    each curve is drawn as its moving average, with the raw points faint behind it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = {label: read_metrics(Path(folder)) for label, folder in runs.items()}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=True):
        for n, (label, rows) in enumerate(loaded.items()):
            steps, values = series(rows, panel)
            if not values:
                continue
            window = smoothing_window(smooth, len(values))
            ax.plot(steps, values, linestyle="none", marker="o", markersize=2, alpha=0.2, color=f"C{n}")
            ax.plot(steps, smooth_values(values, window), color=f"C{n}", linewidth=1.6, label=label,
                    gid=f"smooth:{label}:{panel}")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


smooth_values = smooth  # plot_comparison's ``smooth`` argument shadows the function's name there
