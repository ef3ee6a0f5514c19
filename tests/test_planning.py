"""`r1-mm plan`: exact parameter counts from config.json alone, the sharding arithmetic of each ZeRO
stage, and the estimate against the peak RSS of real CPU runs (tiny and real-vocabulary models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r1_mm.config import load_recipe
from r1_mm.planning import GIB, launch_zero_stage, model_shape, plan

from .conftest import REPO

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))


def test_parameter_counts_are_exact_without_loading_weights():
    from r1_mm.models import load_model

    cfg = load_recipe(None, ["model.name_or_path=tiny:qwen2_5_vl", "model.lora=true"])
    shape = model_shape(cfg)
    model = load_model(cfg.model)
    assert shape.lora_params == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert shape.total_params == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def test_zero_stages_shard_what_they_shard():
    cfg = load_recipe(None, ["model.name_or_path=tiny:qwen2_5_vl", "model.dtype=bfloat16"])
    shape = model_shape(cfg)
    part = {s: {line.name: line.bytes for line in plan(cfg, gpus=8, zero_stage=s, shape=shape).lines} for s in range(4)}
    weights = shape.total_params * 2
    assert part[0]["policy weights"] == part[2]["policy weights"] == weights
    assert part[3]["policy weights"] == weights / 8 and part[3]["reference weights"] == weights / 8
    assert part[1]["gradients"] == weights and part[2]["gradients"] == weights / 8
    assert part[0]["optimizer states"] == 2 * weights and part[1]["optimizer states"] == 2 * weights / 8
    bf16 = {line.name: line.bytes for line in plan(cfg, gpus=8, zero_stage=3, mixed_bf16=True, shape=shape).lines}
    assert bf16["optimizer states"] == 12 * shape.total_params / 8  # DeepSpeed's fp32 master + states
    assert launch_zero_stage(REPO / "recipes" / "accelerate" / "zero3.yaml") == (3, False)
    assert launch_zero_stage(REPO / "recipes" / "accelerate" / "ddp.yaml") == (0, False)


RECIPE = """
data: {{max_prompt_length: 512, format_instruction: null}}
media: {{min_pixels: 50176, max_pixels: 50176}}
rollout: {{num_generations: {g}, max_completion_length: {c}}}
rewards: {{functions: [{{name: "{plugin}:length_reward"}}]}}
algorithm: {{beta: 0.04}}
training: {{max_steps: 2, prompts_per_step: 1, learning_rate: 1.0e-4}}
logging: {{progress_bar: false}}
"""


@pytest.mark.parametrize(("model", "g", "c"), [("tiny:qwen2_5_vl", 4, 32), ("tiny:qwen2_5_vl:vocab=151936", 8, 256)],
                         ids=["tiny_vocabulary", "real_vocabulary"])
def test_estimate_is_within_30_percent_of_a_measured_cpu_run(tmp_path, synthetic_data, tiny_cache, model, g, c):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(g=g, c=c, plugin=REPO / "tests" / "plugins" / "test_rewards.py"))
    overrides = [f"model.name_or_path={model}", f"data.train_path={synthetic_data['counting']}",
                 f"training.output_dir={tmp_path / 'run'}"]
    # a clean environment: what earlier tests left in this process's environment (service sockets, library
    # paths, logging levels of engines they started) must not change what the run under measurement loads
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "WANDB_MODE")
           if k in os.environ}
    env["R1MM_CACHE"] = str(tiny_cache.parent)
    estimate = subprocess.run([str(BIN / "r1-mm"), "plan", str(recipe), *overrides, "--cpu", "--json"], env=env,
                              capture_output=True, text=True, timeout=300)
    assert estimate.returncode == 0, estimate.stderr[-2000:]
    planned = json.loads(estimate.stdout)["total_bytes"]
    run = subprocess.run([str(BIN / "r1-mm"), "train", str(recipe), *overrides], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = max(m["memory/peak_rss_mib"] for m in metrics) * 2**20
    assert min(m["completions/mean_length"] for m in metrics) > 0.8 * c  # the shapes the estimate assumes
    assert abs(planned - measured) / measured < 0.30, (planned / GIB, measured / GIB)


INHERIT = """
import subprocess, sys
ballast = bytearray(600 * 2**20)  # the parent holds 600 MiB when it starts the child
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
child = "import resource; from r1_mm.memory import peak_rss_bytes; print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout)
"""


def test_peak_memory_is_the_process_own():
    """ru_maxrss survives fork + exec on Linux (a child of a big test runner reports the runner's peak);
    the measure the runs log does not."""
    proc = subprocess.run([sys.executable, "-c", INHERIT], capture_output=True, text=True, timeout=120)
    own, inherited = map(int, proc.stdout.split())
    assert inherited > 600 * 2**20 and own < 300 * 2**20, (own, inherited)
