"""`r1-mm eval --lmms-eval`: a checkpoint's exported model/ scored by the real lmms-eval harness
(installed in .venv-eval) on a local task definition, its results read back from lmms-eval's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r1_mm.config.recipe import load_recipe

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent

TASK_YAML = """task: r1mm_counting
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: solution
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""
TASK_UTILS = """import os
from PIL import Image

ROOT = {root!r}


def doc_to_visual(doc):
    return [Image.open(os.path.join(ROOT, doc["image"])).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["prompt"]


def process_results(doc, results):
    return {{"exact_match": float(results[0].strip() == str(doc["solution"]).strip())}}
"""


def local_task(folder: Path, data: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "r1mm_counting.yaml").write_text(TASK_YAML.format(data=data))
    (folder / "utils.py").write_text(TASK_UTILS.format(root=str(data.parent)))
    return folder


def test_a_checkpoint_scored_by_lmms_eval_on_a_local_task(tmp_path, synthetic_data, tiny_cache, monkeypatch):
    from r1_mm.trainers.grpo import GRPOTrainer

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    cfg = load_recipe(None, ["model.name_or_path=tiny:qwen2_5_vl:small", f"data.train_path={synthetic_data['counting']}",
                             f"training.output_dir={tmp_path / 'run'}", "data.format_instruction=null",
                             "media.max_pixels=3136", "media.min_pixels=3136", "rollout.num_generations=2",
                             "rollout.max_completion_length=3", "training.max_steps=1", "logging.progress_bar=false",
                             "rewards.functions=[{name: numeric, kwargs: {require_tag: false}}]"])
    GRPOTrainer(cfg).train()
    (checkpoint,) = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    tasks = local_task(tmp_path / "tasks", synthetic_data["counting"])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([str(BIN / "r1-mm"), "eval", "--lmms-eval", "r1mm_counting", "--checkpoint", str(checkpoint),
                           "--include-path", str(tasks), "--", "--log_samples"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    rows = len(synthetic_data["counting"].read_text().splitlines())
    assert out["n_samples"]["r1mm_counting"]["effective"] == rows
    score = out["results"]["r1mm_counting"]["exact_match,none"]
    # the premise: lmms-eval itself loaded THIS checkpoint's export and scored every document
    results = json.loads(Path(out["results_file"]).read_text())
    assert str(checkpoint / "model") in results["config"]["model_args"]
    samples = [json.loads(line) for f in Path(out["results_file"]).parent.glob("*_samples_r1mm_counting.jsonl")
               for line in f.read_text().splitlines()]
    assert len(samples) == rows and score == pytest.approx(sum(s["exact_match"] for s in samples) / rows)


def test_without_the_eval_environment_one_line(tmp_path):
    env = dict(os.environ, R1MM_EVAL_PYTHON=str(tmp_path / "nope" / "python"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    proc = subprocess.run([str(BIN / "r1-mm"), "eval", "--lmms-eval", "mme", "--checkpoint", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=120, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "bash scripts/setup_eval.sh" in lines[0], proc.stderr[-2000:]
