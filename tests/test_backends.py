"""The same recipe trains under accelerate on 2 CPU processes: DDP, DeepSpeed ZeRO-3 (with the
reference model), LoRA with and without ZeRO-3, gradient checkpointing and a frozen vision tower.
Real processes over gloo; slow (each launch ~20-40 s)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO

BIN = Path(sys.executable).parent
PLUGIN = REPO / "tests" / "plugins" / "test_rewards.py"

RECIPE = f"""
model:
  name_or_path: tiny:qwen2_5_vl:small
data:
  max_prompt_length: 256
  format_instruction: null
media:
  min_pixels: 12544
  max_pixels: 12544
rollout:
  num_generations: 4
  max_completion_length: 6
rewards:
  functions:
    - {{name: "{PLUGIN}:length_reward"}}
algorithm:
  beta: 0.04
training:
  max_steps: 3
  prompts_per_step: 2
  learning_rate: 1.0e-3
logging:
  progress_bar: false
"""

# ZeRO-3 with every parameter partitioned (the tiny model's tensors would otherwise all fall under
# DeepSpeed's persistence threshold and never be sharded, hiding gather/export bugs).
ZERO3_PARTITIONED = """
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {json}
  zero3_init_flag: false
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
rdzv_backend: static
same_network: true
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synthetic_data, tiny_cache):
    root = tmp_path_factory.mktemp("backends")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE)
    z3 = root / "zero3_partitioned.yaml"
    z3.write_text(ZERO3_PARTITIONED.format(json=REPO / "tests" / "configs" / "zero3_partitioned.json"))
    return root, recipe, z3, synthetic_data["counting"], tiny_cache


def launch(config: Path, recipe: Path, out: Path, data: Path, cache: Path, *overrides: str) -> list[dict]:
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "-m", "r1_mm.train", str(recipe),
           f"data.train_path={data}", f"training.output_dir={out}", *overrides]
    env = dict(__import__("os").environ, R1MM_CACHE=str(cache.parent))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_run(metrics: list[dict], out: Path, initial: dict[str, torch.Tensor], *, with_kl: bool = True):
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert all(m["rewards/total"] > 0 for m in metrics)
    assert any(abs(m["train/loss"]) > 0 for m in metrics)
    if with_kl:
        assert metrics[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update
        assert metrics[-1]["train/kl"] > 0
    exported = load_file(out / "checkpoints" / "step-000003" / "model" / "model.safetensors")
    assert set(exported) == set(initial)
    assert all(exported[k].shape == initial[k].shape for k in initial)  # gathered, not ZeRO-3 shards
    changed = [k for k in initial if not torch.equal(exported[k], initial[k])]
    assert changed, "training did not change the exported weights"
    return changed


@pytest.fixture(scope="module")
def initial_weights(tiny_cache):
    from r1_mm.testing.tiny_models import TinySpec, tiny_model_path

    path = tiny_model_path(TinySpec(small_vocab=True), cache_dir=tiny_cache)
    return load_file(path / "model.safetensors")


@pytest.mark.slow
def test_ddp_two_processes(setup, initial_weights):
    root, recipe, _, data, cache = setup
    out = root / "ddp"
    metrics = launch(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml", recipe, out, data, cache,
                     "model.gradient_checkpointing=true")
    check_run(metrics, out, initial_weights)


@pytest.mark.slow
def test_zero3_two_processes_with_reference(setup, initial_weights):
    root, recipe, z3, data, cache = setup
    out = root / "zero3"
    metrics = launch(z3, recipe, out, data, cache, "algorithm.ref_sync_steps=3")  # synced after the last step
    check_run(metrics, out, initial_weights)
    # the synced reference moved, so the checkpoint carries it, gathered to full shapes
    reference = load_file(out / "checkpoints" / "step-000003" / "reference.safetensors")
    assert all(v.numel() > 0 for v in reference.values())  # full tensors, not empty ZeRO-3 partitions
    ref_numel, initial_numel = sum(v.numel() for v in reference.values()), sum(v.numel() for v in initial_weights.values())
    assert ref_numel in (initial_numel, initial_numel - initial_weights["lm_head.weight"].numel())  # tied head once


@pytest.mark.slow
def test_zero3_recipe_config_as_shipped(setup, initial_weights):
    root, recipe, _, data, cache = setup
    out = root / "zero3_shipped"
    metrics = launch(REPO / "recipes" / "accelerate" / "zero3.yaml", recipe, out, data, cache,
                     "model.freeze_vision_tower=true")
    changed = check_run(metrics, out, initial_weights)
    assert not any(k.startswith("model.visual.") for k in changed)  # the frozen tower stayed frozen


@pytest.mark.slow
def test_lora_under_zero3_exports_merged_weights(setup, initial_weights):
    root, recipe, z3, data, cache = setup
    out = root / "lora_zero3"
    metrics = launch(z3, recipe, out, data, cache, "model.lora=true", "model.gradient_checkpointing=true")
    changed = check_run(metrics, out, initial_weights)
    # LoRA touches only the targeted language-model projections; the merge put them into the base weights
    assert changed and all(k.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"} for k in changed)


@pytest.mark.slow
def test_lora_ddp(setup, initial_weights):
    root, recipe, _, data, cache = setup
    out = root / "lora_ddp"
    metrics = launch(REPO / "recipes" / "accelerate" / "ddp.yaml", recipe, out, data, cache, "model.lora=true")
    check_run(metrics, out, initial_weights)


@pytest.mark.slow
def test_lora_zero3_weight_sync_to_vllm_pool(setup, initial_weights):
    """ZeRO-3 + LoRA + a vLLM rollout server: merged weights gathered in buckets by both ranks reach the
    server after every step, so its sampling logprobs keep matching the learner's."""
    root, recipe, z3, data, cache = setup
    out = root / "lora_zero3_pool"
    metrics = launch(z3, recipe, out, data, cache, "model.lora=true", "rollout.engine=vllm_pool",
                     "rollout.pool_size=1", "rollout.vllm_dtype=float32", "rollout.vllm_max_model_len=2048",
                     "rollout.weight_sync_bucket_mb=1", "training.learning_rate=1.0e-2")
    check_run(metrics, out, initial_weights)
    for m in metrics:
        assert m["rollout/logprob_abs_diff_mean"] < 0.05 and m["rollout/is_dropped_frac"] == 0.0


@pytest.mark.slow
def test_zero3_lora_with_colocated_vllm(setup, initial_weights):
    """One vLLM engine per ZeRO-3 rank: both ranks gather the LoRA-merged weights bucket by bucket and load them."""
    root, recipe, z3, data, cache = setup
    out = root / "zero3_colocate"
    metrics = launch(z3, recipe, out, data, cache, "model.lora=true", "rollout.engine=vllm_colocate",
                     "rollout.vllm_dtype=float32", "rollout.vllm_max_model_len=2048",
                     "rollout.weight_sync_bucket_mb=1", "training.learning_rate=1.0e-2")
    check_run(metrics, out, initial_weights)
    for m in metrics:
        assert m["rollout/logprob_abs_diff_mean"] < 0.05 and m["rollout/is_dropped_frac"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero3_partitioned", "ddp"])
def test_dpo_with_lora_on_two_processes(setup, initial_weights, config):
    root, recipe, z3, data, cache = setup
    pairs = root / f"pairs_{config}.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for i, row in enumerate(rows):
        row.update(image=str(data.parent / row["image"]), chosen=str(row["solution"]), rejected=str(i % 3 + 5))
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = root / f"dpo_{config}"
    launcher = z3 if config == "zero3_partitioned" else REPO / "recipes" / "accelerate" / "ddp.yaml"
    metrics = launch(launcher, recipe, out, pairs, cache, "algorithm.name=dpo", "model.lora=true",
                     "algorithm.nll_weight=0.5")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert metrics[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and metrics[-1]["rewards/margins"] > 0
    exported = load_file(out / "checkpoints" / "step-000003" / "model" / "model.safetensors")
    assert set(exported) == set(initial_weights)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2", "zero3_offload"])
def test_shipped_deepspeed_configs_train(setup, initial_weights, config):
    """recipes/accelerate/zero2.yaml and zero3_offload.yaml, unchanged, on 2 CPU processes."""
    root, recipe, _, data, cache = setup
    out = root / config
    metrics = launch(REPO / "recipes" / "accelerate" / f"{config}.yaml", recipe, out, data, cache)
    check_run(metrics, out, initial_weights)
