"""What a GRPO run logs about its rollouts: completions.jsonl holds every group (or a sampled share)
with the prompt, its problem_type and each reward's value; metrics per problem type reach
metrics.jsonl and the trackers (a recording tracker plugin, as in test_trackers.py); a plugin reward's
metrics are named by its function, not its file path. Real tiny-model training runs on the synthetic
video task, whose rows alternate temporal and multiple-choice questions."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from r1_mm.core.seeds import derive_seed
from r1_mm.rewards.reward_metrics import metric_labels
from r1_mm.rollout.records import sampled_groups
from r1_mm.trainers.grpo import GRPOTrainer

from .conftest import REPO
from .test_trackers import RECORDER
from .test_trackers import recipe as trackers_recipe

PLUGIN = f"{REPO}/tests/plugins/faulty.py:alternating"
REWARDS = ("rewards.functions=[{name: format}, {name: by_problem_type, kwargs: {require_tag: false}}, "
           f"{{name: '{PLUGIN}', weight: 0.5}}]")


@pytest.fixture(autouse=True)
def _env(tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))


def recipe(tmp_path: Path, data: Path, *overrides: str):
    return trackers_recipe(tmp_path, data, "data.shuffle=false", REWARDS, *overrides)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_group_with_prompt_type_and_rewards_and_metrics_per_type(tmp_path, synthetic_data):
    data = synthetic_data["events"]
    source = {r["id"]: r for r in jsonl(data)}
    cfg = recipe(tmp_path, data, f"logging.report_to=['{RECORDER}']")
    GRPOTrainer(cfg).train()
    run_dir = Path(cfg.training.output_dir)
    rows = jsonl(run_dir / "completions.jsonl")
    # every group of every step: 2 steps x 2 prompts x G=4 (main logged only the first group: 8 rows)
    assert len(rows) == 2 * 2 * 4
    groups = defaultdict(list)
    for r in rows:
        groups[(r["step"], r["group"])].append(r)
    assert sorted(groups) == [(0, 0), (0, 1), (1, 0), (1, 1)] and all(len(g) == 4 for g in groups.values())
    for r in rows:
        row = source[r["row_id"]]
        assert r["problem_type"] == row["problem_type"] and r["solution"] == row["solution"]
        assert row["prompt"] in r["prompt"]
        assert list(r["rewards"]) == ["format", "by_problem_type", "alternating"]
        values = r["rewards"]
        weighted = [v * w for v, w in zip(values.values(), (1.0, 1.0, 0.5), strict=True) if v is not None]
        assert r["reward"] == pytest.approx(sum(weighted))
        assert isinstance(r["advantage"], float) and isinstance(r["tokens"], int)
    assert {r["problem_type"] for r in rows} == {"temporal", "mcq"}  # the premise: a mixed run
    for g in groups.values():  # one prompt per group; GRPO advantages centre on the group
        assert len({r["row_id"] for r in g}) == 1
        assert sum(r["advantage"] for r in g) == pytest.approx(0.0, abs=1e-5)

    metrics = jsonl(run_dir / "metrics.jsonl")
    for m in metrics:
        step_rows = [r for r in rows if r["step"] == m["step"]]
        for kind in ("temporal", "mcq"):
            mine = [r for r in step_rows if r["problem_type"] == kind]
            key = f"rewards/by_type/{kind}/"
            assert m[key + "completions"] == len(mine) == 4
            assert m[key + "total"] == pytest.approx(sum(r["reward"] for r in mine) / 4)
            for fn in ("format", "by_problem_type", "alternating"):
                assert m[key + f"{fn}/mean"] == pytest.approx(sum(r["rewards"][fn] for r in mine) / 4)
        # the plugin's metrics carry its function name, not the file path
        assert m["rewards/alternating/mean"] == 0.5 and not any(".py" in k for k in m)
    # the trackers get the per-type metrics too
    logs = [e for e in map(json.loads, (run_dir / "trackers" / "recording.jsonl").read_text().splitlines())
            if e["event"] == "log"]
    assert [e["step"] for e in logs] == [0, 1]
    for e, m in zip(logs, metrics, strict=True):
        per_type = {k: v for k, v in m.items() if k.startswith("rewards/by_type/")}
        assert len(per_type) == 2 * 5 and all(e["values"][k] == v for k, v in per_type.items())


def test_sampled_share_of_groups(tmp_path, synthetic_data):
    cfg = recipe(tmp_path, synthetic_data["events"], "logging.completions_sample_rate=0.5",
                 "training.prompts_per_step=4", "training.max_steps=3")
    GRPOTrainer(cfg).train()
    rows = jsonl(Path(cfg.training.output_dir) / "completions.jsonl")
    logged = defaultdict(list)
    for r in rows:
        logged[r["step"]].append(r["group"])
    # whole groups, and the groups a resumed run would pick again (seeded by run seed, step, rank)
    expected = {s: sampled_groups(4, 0.5, derive_seed(cfg.training.seed, "completion_log", s, 0)) for s in range(3)}
    assert {s: sorted(set(g)) for s, g in logged.items()} == {s: g for s, g in expected.items() if g}
    assert all(g.count(i) == 4 for g in logged.values() for i in set(g))
    assert 0 < len(rows) < 3 * 4 * 4  # some groups, not all (the premise of a sample)


def test_sample_rate_bounds_and_labels():
    assert sampled_groups(7, 1.0, "s") == list(range(7)) and sampled_groups(7, 0.0, "s") == []
    picked = sampled_groups(10_000, 0.1, "s")
    assert 800 < len(picked) < 1200 and picked == sampled_groups(10_000, 0.1, "s")
    assert metric_labels(["format", "/home/me/x.py:acc", "pkg.mod:acc", "format", "a b/c"]) == \
        ["format", "acc", "acc_2", "format_2", "a_b_c"]
