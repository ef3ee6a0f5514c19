"""Training curves from a run's ``metrics.jsonl`` to a PNG (``r1-mm plot RUN_DIR``)."""

from __future__ import annotations

from pathlib import Path

from r1_mm.tracking import read_metrics

DEFAULT_PANELS = ("rewards", "train/kl", "completions/mean_length", "train/entropy")


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None, *, smooth: int = 20,
             panels: tuple[str, ...] = DEFAULT_PANELS) -> Path:
    """Draw one panel per metric group; ``rewards`` draws every ``rewards/<name>/mean`` curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no rows")
    steps = [r["step"] for r in rows]
    minutes = rows[-1].get("time", 0.0) / 60
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "rewards":
            keys = sorted(k for k in rows[0] if k.startswith("rewards/") and k.endswith("/mean"))
        else:
            keys = [panel] if panel in rows[0] else []
        for key in keys:
            values = [float(r.get(key, float("nan"))) for r in rows]
            ax.plot(steps, values, alpha=0.25)
            ax.plot(steps, _smooth(values, smooth), label=key.replace("rewards/", "").replace("/mean", ""))
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if keys and panel == "rewards":
            ax.legend(fontsize=8)
    fig.suptitle(f"{run_dir.name}: {len(rows)} logged steps, {minutes:.1f} min")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
