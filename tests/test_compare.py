"""``r1-mm compare``: the first step at which a metric's trailing mean reaches a threshold, and the seconds to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1_mm.cli import main
from r1_mm.run.compare import first_reached, reached, training_seconds


def write_run(folder: Path, values: list[float], step_s: float = 0.5, start: float = 3.0) -> Path:
    """A metrics.jsonl as the tracker writes it: ``time`` counts from the tracker's start (here ``start`` seconds
    of set-up before the first step)."""
    folder.mkdir(parents=True)
    rows = [{"step": i, "time": start + (i + 1) * step_s, "time/step_s": step_s, "rewards/accuracy/mean": v}
            for i, v in enumerate(values)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_a_single_lucky_step_does_not_reach_the_target_but_a_trailing_mean_does():
    rows = [{"m": v} for v in [0.0, 1.0, 0.0, 0.0, 0.9, 0.9, 0.8, 0.7]]
    assert first_reached(rows, "m", 0.8, 1) == (1, 1.0)  # one step: the lucky one
    index, best = first_reached(rows, "m", 0.8, 3)
    assert index == 6 and best == pytest.approx((0.9 + 0.9 + 0.8) / 3)  # 0.9, 0.9, 0.8 are the first 3 >= 0.8
    assert first_reached(rows, "m", 0.95, 3)[0] is None
    assert first_reached(rows[:2], "m", 0.0, 3) == (None, None)  # fewer rows than the window


def test_rows_without_the_metric_are_skipped_not_counted_as_zero():
    rows = [{"m": 1.0}, {"other": 0.0}, {"m": 1.0}]
    assert first_reached(rows, "m", 1.0, 2) == (2, 1.0)


def test_training_seconds_leave_the_set_up_out():
    rows = [{"time": 13.0, "time/step_s": 2.0}, {"time": 14.5}]  # 11 s of set-up, then steps of 2 s and 1.5 s
    assert training_seconds(rows, 0) == pytest.approx(2.0)
    assert training_seconds(rows, 1) == pytest.approx(3.5)


def test_reached_counts_steps_trained_and_seconds(tmp_path):
    run = write_run(tmp_path / "a", [0.0, 0.5, 0.9, 0.9, 1.0])
    r = reached("a", run, "rewards/accuracy/mean", 0.8, 2)
    assert (r.step, r.seconds, r.steps_run, r.seconds_run) == (4, pytest.approx(2.0), 5, pytest.approx(2.5))
    with pytest.raises(ValueError, match="no row logs 'rewards/numeric/mean'"):
        reached("a", run, "rewards/numeric/mean", 0.8, 2)


def test_cli_prints_the_table_with_ratios_and_draws_the_curves(tmp_path, capsys):
    slow = write_run(tmp_path / "slow", [0.0] * 6 + [1.0] * 4)
    fast = write_run(tmp_path / "fast", [0.0] * 2 + [1.0] * 8, step_s=0.25)
    never = write_run(tmp_path / "never", [0.5] * 10)
    png = tmp_path / "cmp.png"
    assert main(["compare", f"sync={slow}", f"async K=1={fast}", f"flat={never}", "--window", "2", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| sync | 10 | 5.0 | 8 | 4.0 | 1.00 | 1.000 |" in out
    assert "| async K=1 | 10 | 2.5 | 4 | 1.0 | 0.50 | 1.000 |" in out
    assert "| flat | 10 | 5.0 | not reached | - | - | 0.500 |" in out
    assert png.stat().st_size > 0


def test_cli_names_the_run_that_never_logs_the_metric(tmp_path, capsys):
    run = write_run(tmp_path / "a", [1.0, 1.0])
    assert main(["compare", str(run), "--metric", "rewards/numeric/mean"]) == 2
    assert f"{run}: no row logs 'rewards/numeric/mean'" in capsys.readouterr().err
