"""Every class of bad input stops the run in one line (file, row or field, and what to do), exit code 2,
before the model loads: the tests make loading a model fail loudly, so a check that came too late fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import r1_mm.trainers.backend as backend
from r1_mm.jobs.train import main as train_main

from .conftest import REPO

BIN = Path(sys.executable).parent

RECIPE = """
model: {name_or_path: "tiny:qwen2_5_vl:small"}
data: {format_instruction: null}
media: {max_pixels: 3136, min_pixels: 3136}
rollout: {num_generations: 2, max_completion_length: 2}
rewards: {functions: [{name: numeric, kwargs: {require_tag: false}}]}
training: {max_steps: 1, prompts_per_step: 1}
logging: {progress_bar: false}
"""


@pytest.fixture
def run(tmp_path, synthetic_data, tiny_cache, monkeypatch, capsys):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(backend, "load_model", no_model)

    def go(*overrides: str, recipe_text: str = RECIPE, data: Path | None = None) -> str:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(recipe_text)
        code = train_main([str(recipe), f"data.train_path={data or synthetic_data['counting']}",
                           f"training.output_dir={tmp_path / 'run'}", *overrides])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1, err[-2000:]
        return lines[0]
    return go


def rows_file(tmp_path, synthetic_data, edit) -> Path:
    rows = [json.loads(line) for line in synthetic_data["counting"].read_text().splitlines()]
    path = tmp_path / "rows.jsonl"
    text = edit(rows, synthetic_data["counting"].parent)
    path.write_text(text)
    return path


def test_invalid_yaml_names_the_file_and_line(run, tmp_path):
    line = run(recipe_text=RECIPE + "training: {max_steps: [1,\n")
    assert f"{tmp_path / 'recipe.yaml'}:10:1: invalid YAML" in line  # where the parser gave up


@pytest.mark.parametrize(("override", "expected"), [
    ("algorithm.grpo.loss_type=dapoo", "algorithm.grpo.loss_type 'dapoo' is not a loss; did you mean 'dapo'?"),
    ("rollout.engine=vllm_colocated", "rollout.engine 'vllm_colocated' is not an engine; did you mean 'vllm_colocate'?"),
    ("algorithm.grpo.advantage_estimator=grpoo", "did you mean 'grpo'?"),
    ("rewards.functions=[{name: numeric, kwargs: {require_tags: false}}]",
     "kwargs.require_tags is not an option of this reward; did you mean 'require_tag'?"),
    ("rewards.functions=[{name: numerik}]", "unknown reward 'numerik'; did you mean 'numeric'?"),
    ("rewards.functions=[{name: by_problem_type, kwargs: {reward_kwargs: {mra: {tagg: x}}}}]",
     "kwargs.tagg is not an option of this reward; did you mean 'tag'?"),
    ("logging.logging_steps=0", "logging.logging_steps must be >= 1, got 0"),
    ("logging.completions_sample_rate=1.5", "logging.completions_sample_rate must be >= 0 and <= 1, got 1.5"),
    ("algorithm.grpo.num_iterations=0", "algorithm.grpo.num_iterations must be >= 1, got 0"),
    ("rollout.temperature=-1", "rollout.temperature must be >= 0, got -1.0"),
    ("rollout.temperature=0", "rollout.temperature is 0 (greedy)"),
    ("rollout.top_p=1.5", "rollout.top_p must be > 0 and <= 1, got 1.5"),
    ("training.max_steps=0", "training.max_steps must be >= 1"),
    ("data.train_path=/no/such/file.jsonl", "data file not found: /no/such/file.jsonl"),
    ("logging.report_to=[wandbb]", "logging.report_to 'wandbb' is not a tracker; did you mean 'wandb'?"),
    ("logging.report_to=[mlflow]", "logging.report_to 'mlflow' needs its package: pip install mlflow"),
    (f"logging.report_to=[{REPO}/tests/plugins/faulty.py:alternating]", "is not a subclass of accelerate.tracking.GeneralTracker"),
    ("logging.report_to=[no_such_file.py:Tracker]", "logging.report_to 'no_such_file.py:Tracker': file not found"),
    ("logging.tracker_kwargs={tensorboard: {flush_secs: 1}}", "logging.tracker_kwargs 'tensorboard' is not in logging.report_to"),
])
def test_recipe_and_name_errors(run, override, expected):
    assert expected in run(override)


def test_malformed_jsonl_line_names_file_and_line(run, tmp_path, synthetic_data):
    data = rows_file(tmp_path, synthetic_data, lambda rows, root: "".join(
        json.dumps({**r, "image": str(root / r["image"])}) + "\n" for r in rows[:3]) + '{"prompt": "x", \n')
    line = run(data=data)
    assert f"{data}:4: not valid JSON" in line


def test_missing_solution_is_an_error_whatever_the_batch_order(run, tmp_path, synthetic_data):
    def drop(rows, root):
        rows = [{**r, "image": str(root / r["image"])} for r in rows]
        del rows[5]["solution"]
        return "".join(json.dumps(r) + "\n" for r in rows)

    data = rows_file(tmp_path, synthetic_data, drop)
    line = run(data=data)
    assert f"{data}: row 5 (id counting-5)" in line and "no 'solution' column, which numeric need(s)" in line


def test_row_without_a_prompt(run, tmp_path, synthetic_data):
    data = rows_file(tmp_path, synthetic_data, lambda rows, root: "".join(
        json.dumps({k: v for k, v in {**r, "image": str(root / r["image"])}.items() if k != "prompt" or i != 2}) + "\n"
        for i, r in enumerate(rows)))
    assert f"{data}: row 2 (id counting-2) has no prompt" in run(data=data)


def test_preference_rows_need_chosen_and_rejected(run, tmp_path, synthetic_data):
    data = rows_file(tmp_path, synthetic_data, lambda rows, root: "".join(
        json.dumps({**r, "image": str(root / r["image"]), "chosen": "3", **({"rejected": "4"} if i else {})}) + "\n"
        for i, r in enumerate(rows)))
    line = run("algorithm.name=dpo", data=data)
    assert f"{data}: row 0" in line and "no 'rejected' column, which algorithm.name=dpo need(s)" in line


def test_command_line_prints_one_line_and_no_traceback(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    proc = subprocess.run([str(BIN / "r1-mm"), "train", str(recipe), "algorithm.grpo.loss_type=zzz",
                           f"model.name_or_path={tmp_path / 'no-model'}", "data.train_path=x.jsonl"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: algorithm.grpo.loss_type 'zzz' is not a loss; known: bnpo, cispo, dapo, dr_grpo, gmpo, grpo, sapo"]
