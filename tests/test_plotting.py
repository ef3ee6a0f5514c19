"""`r1-mm plot`: chosen panels, the logged points under the smoothed line, a window no wider than a
tenth of the run, and one line naming an unknown metric. The figure's matplotlib objects are read
(the lines' gids and data), not its pixels; metrics.jsonl files are written here with known values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from r1_mm.cli import main
from r1_mm.run.plotting import draw_run


def write_run(folder: Path, steps: int) -> Path:
    """A run's metrics.jsonl: a noisy reward, a KL, and a per-type reward logged every other step only."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(steps):
        row = {"step": s, "time": s * 2.0, "rewards/total": (s % 3) * 0.5, "rewards/format/mean": s / steps,
               "rewards/acc/mean": float((s * 7) % 5), "train/kl": 0.01 * s, "train/entropy": "nan" if s == 3 else 1.0,
               "completions/mean_length": 10.0 + s}
        if s % 2 == 0:
            row["rewards/by_type/mcq/total"] = 1.0 - s / steps
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def lines(fig) -> dict[str, object]:
    return {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}


def trailing_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def test_chosen_panels_raw_points_under_the_smoothed_line(tmp_path):
    run = write_run(tmp_path / "run", 50)
    fig = draw_run(run, smooth_window=20, panels=["train/kl", "rewards/acc/mean", "rewards/by_type/*/total"])
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().split(" (")[0] for ax in visible] == ["train/kl", "rewards/acc/mean", "rewards/by_type/*/total"]
    drawn = lines(fig)
    assert set(drawn) == {f"{kind}:{k}" for kind in ("raw", "smooth")
                          for k in ("train/kl", "rewards/acc/mean", "rewards/by_type/mcq/total")}
    raw, smoothed = drawn["raw:rewards/acc/mean"], drawn["smooth:rewards/acc/mean"]
    values = [float((s * 7) % 5) for s in range(50)]
    # every logged point is drawn as a marker (no line), beneath the smoothed curve
    assert list(raw.get_ydata()) == values and raw.get_linestyle() == "None" and raw.get_marker() == "o"
    assert raw.get_zorder() < smoothed.get_zorder() and raw.get_color() == smoothed.get_color()
    # 50 steps: the window is 5 (a tenth of the run), not the 20 asked for
    assert list(smoothed.get_ydata()) == pytest.approx(trailing_mean(values, 5))
    assert list(smoothed.get_ydata()) != pytest.approx(trailing_mean(values, 20))
    # a metric logged in half of the steps: 25 points, window 2
    by_type = drawn["raw:rewards/by_type/mcq/total"]
    assert list(by_type.get_xdata()) == list(range(0, 50, 2))
    assert list(drawn["smooth:rewards/by_type/mcq/total"].get_ydata()) == pytest.approx(
        trailing_mean([1.0 - s / 50 for s in range(0, 50, 2)], 2))


def test_a_short_run_is_not_smoothed(tmp_path):
    run = write_run(tmp_path / "run", 12)
    drawn = lines(draw_run(run, smooth_window=20))  # default panels
    # 12 steps: window max(1, 12 // 10) = 1, the curve is the values themselves
    for key in ("rewards/format/mean", "rewards/acc/mean", "train/kl"):
        assert list(drawn[f"smooth:{key}"].get_ydata()) == list(drawn[f"raw:{key}"].get_ydata())
    # the "rewards" panel: each reward function's mean, not per-type curves or the total
    assert {g for g in drawn if g.startswith("raw:rewards/")} == {"raw:rewards/format/mean", "raw:rewards/acc/mean"}
    # a NaN step is left out of the points, not drawn as a gap in the average
    entropy = drawn["raw:train/entropy"]
    assert len(entropy.get_xdata()) == 11 and 3 not in list(entropy.get_xdata())
    assert not any(math.isnan(v) for v in drawn["smooth:train/entropy"].get_ydata())


def test_cli_metrics_option_and_unknown_metric(tmp_path, capsys):
    run = write_run(tmp_path / "run", 30)
    out = tmp_path / "curves.png"
    assert main(["plot", str(run), "--metrics", "rewards,completions/mean_length", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert main(["plot", str(run), "--metrics", "train/kl,rewards/acc/maen"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: metric 'rewards/acc/maen' is not in this run's metrics.jsonl; "
                   "did you mean 'rewards/acc/mean'?"]
    assert not (run / "curves.png").exists()  # nothing drawn
