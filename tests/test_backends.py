"""The same recipe trains under accelerate on 2 CPU processes: DDP, DeepSpeed ZeRO-2/3 (with the
reference model), LoRA with and without ZeRO-3, gradient checkpointing, a frozen vision tower, DPO,
iterative DPO, gradient accumulation and both vLLM engines. Real processes over gloo; slow (each
launch ~15-40 s). Every test first checks from the run's run_info.json that the back-end it names
really ran (DeepSpeed engine, ZeRO stage, parameters partitioned across the 2 processes; or DDP)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import (
    ACCELERATE_LAUNCH,
    REPO,
    assert_same_updates,
    deepspeed_launch_config,
    rows_with_absolute_media,
    stop_process_group,
)

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
  grpo:
    beta: 0.04
training:
  max_steps: 3
  prompts_per_step: 2
  learning_rate: 1.0e-3
logging:
  progress_bar: false
"""

@pytest.fixture(scope="module")
def setup(tmp_path_factory, synthetic_data, tiny_cache):
    root = tmp_path_factory.mktemp("backends")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE)
    z3 = deepspeed_launch_config(root)
    return root, recipe, z3, synthetic_data["counting"], tiny_cache


def cpu_precision(config: Path) -> list[str]:
    """The shipped DeepSpeed configs run bf16 (what the GPU recipes assume); these CPU tests compare float32
    updates, so they launch them with accelerate's own flag, the one setting changed: --mixed_precision no."""
    import yaml

    return ["--mixed_precision", "no"] if str(yaml.safe_load(config.read_text()).get("mixed_precision")) != "no" else []


def launch(config: Path, recipe: Path, out: Path, data: Path, cache: Path, *overrides: str,
           program: tuple[str, ...] = ("-m", "r1_mm.train"), timeout: float = 600,
           env_extra: dict[str, str] | None = None) -> list[dict]:
    """The run's metrics; ``program`` is what accelerate launches (a script taking the same arguments).
    After ``timeout`` seconds the launcher and its workers (one session) are stopped and the test fails."""
    cmd = [*ACCELERATE_LAUNCH, "--config_file", str(config), *cpu_precision(config), *program,
           str(recipe),
           f"data.train_path={data}", f"training.output_dir={out}", *overrides]
    env = dict(__import__("os").environ, R1MM_CACHE=str(cache.parent), **(env_extra or {}))
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=out.parent,
                             start_new_session=True)
    try:
        stdout, stderr = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(popen)
        stdout, stderr = popen.communicate()
        pytest.fail(f"the launch did not finish in {timeout:.0f} s (a hang?)\n{stdout[-3000:]}{stderr[-5000:]}")
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_backend(out: Path, backend: str, *, engine: str | None = None) -> dict:
    """The premise of a test: what run_info.json (written by the run itself) says really ran."""
    info = json.loads((out / "run_info.json").read_text())
    assert info["num_processes"] == 2, info
    if backend == "ddp":
        assert (info["distributed_type"], info["learner_engine"], info["zero_stage"]) == \
            ("MULTI_CPU", "DistributedDataParallel", None), info
        assert info["partitioned_parameters"] == 0
    else:
        stage = int(backend[-1])
        assert (info["distributed_type"], info["learner_engine"], info["zero_stage"]) == \
            ("DEEPSPEED", "DeepSpeedEngine", stage), info
        assert info["deepspeed_engine_zero_stage"] == stage  # the engine's own view
        if stage == 3:  # parameters really are split: this process holds about half of every tensor
            assert info["partitioned_parameters"] > 0 and info["partitioned_parameters"] == info["zero3_managed_parameters"]
            assert info["local_parameter_elements"] <= info["full_parameter_elements"] // 2 + 64, info
        else:
            assert info["partitioned_parameters"] == 0
    if engine is not None:
        assert info["rollout_engine"] == engine, info
    return info


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


def sft_rows(data: Path, path: Path) -> Path:
    """The counting rows (8, absolute image paths) with a response each, for algorithm: sft."""
    rows = rows_with_absolute_media(data)
    for row in rows:
        row["response"] = f"<think>I count the squares.</think><answer>{row['solution']}</answer>"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SFT = ("algorithm.name=sft", "rewards.functions=[]", "data.shuffle=false", "training.max_steps=2")


def single_process_sft(recipe: Path, out: Path, data: Path, cache: Path, *overrides: str) -> tuple[list[dict], dict]:
    """The same SFT run in this process, on one process: 4 prompts per step (what 2 processes of 2 see, the
    shards alternating over the unshuffled rows), one micro-batch. Its metrics and final exported weights."""
    from r1_mm.config.recipe import load_recipe
    from r1_mm.trainers.sft import SFTTrainer

    mp = pytest.MonkeyPatch()
    mp.setenv("R1MM_CACHE", str(cache.parent))
    try:
        cfg = load_recipe(str(recipe), [f"data.train_path={data}", f"training.output_dir={out}", *SFT, *overrides,
                                        "training.prompts_per_step=4"])
        trainer = SFTTrainer(cfg)
        try:
            trainer.train()
        finally:
            trainer.close()
    finally:
        mp.undo()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, load_file(out / "checkpoints" / "step-000002" / "model" / "model.safetensors")


def assert_same_sft(single: list[dict], multi: list[dict]) -> None:
    """Two processes' SFT steps equal the single process's: the gradient norm and learning rate (global), and
    the step's tokens split between the processes (train/tokens is process 0's share). The premise: SFT's
    metrics, no reward."""
    assert [m["step"] for m in multi] == [m["step"] for m in single] == [0, 1]
    for a, b in zip(single, multi, strict=True):
        assert "train/tokens" in b and not any(k.startswith("rewards/") for k in b), b
        assert 0 < b["train/tokens"] < a["train/tokens"]
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], abs=1e-5, rel=1e-5), (a["step"], a, b)
        assert b["train/lr"] == pytest.approx(a["train/lr"], abs=1e-12)


@pytest.fixture(scope="module")
def initial_weights(tiny_cache):
    from r1_mm.models.tiny import TinySpec, tiny_model_path

    path = tiny_model_path(TinySpec(small_vocab=True), cache_dir=tiny_cache)
    return load_file(path / "model.safetensors")


@pytest.mark.slow
def test_ddp_two_processes(setup, initial_weights):
    """GRPO under DDP with the LR schedule per optimizer step, and top_entropy_quantile's threshold taken over
    both processes' tokens: on each process, the tokens that kept the policy term are exactly those at or above
    the (1 - q) quantile of the union of both processes' scored-token entropies (recomputed here from each
    process's own entropies, recorded by tests/scripts/train_recording_entropy_threshold.py)."""
    import numpy as np

    root, recipe, _, data, cache = setup
    out = root / "ddp"
    quantile = 0.5
    metrics = launch(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml", recipe, out, data, cache,
                     "model.gradient_checkpointing=true", "training.lr_scheduler=linear",
                     f"algorithm.grpo.top_entropy_quantile={quantile}",
                     program=(str(REPO / "tests" / "scripts" / "train_recording_entropy_threshold.py"),))
    assert_backend(out, "ddp", engine="hf")
    check_run(metrics, out, initial_weights)
    # the schedule advances once per optimizer step, not once per process (3 steps, linear decay to 0)
    assert [m["train/lr"] for m in metrics] == pytest.approx([1e-3 * (1 - k / 3) for k in (1, 2, 3)], abs=1e-9)

    ranks = [json.loads((out / f"entropy_threshold.rank{r}.json").read_text())["calls"] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # one micro-batch per step, 3 steps
    local_differs = 0
    for call0, call1 in zip(*ranks, strict=True):
        union = np.array(call0["local"] + call1["local"], dtype=np.float32)
        assert call0["pool_size"] == call1["pool_size"] == len(union) and len(call0["local"]) and len(call1["local"])
        expected = np.float32(np.quantile(union.astype(np.float64), 1.0 - quantile))
        for call in (call0, call1):
            assert call["quantile"] == quantile
            assert call["threshold"] == pytest.approx(float(expected), abs=1e-6)
            assert call["kept"] == [bool(v >= expected) for v in np.array(call["local"], dtype=np.float32)]
            local = np.array(call["local"], dtype=np.float32)
            own = np.float32(np.quantile(local.astype(np.float64), 1.0 - quantile))
            local_differs += [bool(v >= own) for v in local] != call["kept"]
    assert local_differs > 0  # a process's own quantile would have kept other tokens: the gather mattered
    assert all(0.0 < m["train/high_entropy_ratio"] < 1.0 for m in metrics), metrics


@pytest.mark.slow
def test_zero3_recipe_config_as_shipped_with_reference(setup, initial_weights):
    """The shipped ZeRO-3 launch config, a frozen vision tower, and a reference model sharded like the policy
    and synced after the last step (so the checkpoint carries it, gathered to full shapes)."""
    root, recipe, _, data, cache = setup
    out = root / "zero3_shipped"
    metrics = launch(REPO / "recipes" / "accelerate" / "zero3.yaml", recipe, out, data, cache,
                     "model.freeze_vision_tower=true", "algorithm.grpo.ref_sync_steps=3")
    info = assert_backend(out, "zero3", engine="hf")
    assert info["mixed_precision"] == "no"  # the shipped file says bf16; the CPU test's --mixed_precision no won
    assert info["reference"] == "DeepSpeedEngine"  # the reference is sharded the same way
    changed = check_run(metrics, out, initial_weights)
    assert not any(k.startswith("model.visual.") for k in changed)  # the frozen tower stayed frozen
    reference = load_file(out / "checkpoints" / "step-000003" / "reference.safetensors")
    assert all(v.numel() > 0 for v in reference.values())  # full tensors, not empty ZeRO-3 partitions
    ref_numel, initial_numel = sum(v.numel() for v in reference.values()), sum(v.numel() for v in initial_weights.values())
    assert ref_numel in (initial_numel, initial_numel - initial_weights["lm_head.weight"].numel())  # tied head once


@pytest.mark.slow
def test_lora_zero3_weight_sync_to_vllm_pool(setup, initial_weights):
    """ZeRO-3 + LoRA (with gradient checkpointing) + a vLLM rollout server: merged weights gathered in buckets by
    both ranks reach the server after every step, so its sampling logprobs keep matching the learner's; the
    checkpoint exports the merged weights."""
    root, recipe, z3, data, cache = setup
    out = root / "lora_zero3_pool"
    metrics = launch(z3, recipe, out, data, cache, "model.lora=true", "model.gradient_checkpointing=true",
                     "rollout.engine=vllm_pool",
                     "rollout.pool_size=1", "rollout.vllm_dtype=float32", "rollout.vllm_max_model_len=2048",
                     "rollout.weight_sync_bucket_mb=1", "training.learning_rate=1.0e-2")
    info = assert_backend(out, "zero3", engine="vllm_pool")
    assert info["lora"] and info["reference"] is None  # the adapter-disabled policy is the reference
    changed = check_run(metrics, out, initial_weights)
    # LoRA touches only the targeted language-model projections; the merge put them into the base weights
    assert changed and all(k.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"} for k in changed)
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
    assert_backend(out, "zero3", engine="vllm_colocate")
    check_run(metrics, out, initial_weights)
    for m in metrics:
        assert m["rollout/logprob_abs_diff_mean"] < 0.05 and m["rollout/is_dropped_frac"] == 0.0


LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.slow
def test_lora_sft_under_zero3_equals_one_process(setup, initial_weights):
    """algorithm: sft with LoRA on 2 ZeRO-3 processes (every parameter partitioned) equals the
    same run on one process: gradient norms per step, and the merged weights exported after 2 steps. The
    premise: ZeRO-3 partitioned, SFT ran, the adapters trained (the targeted projections moved) and the base
    stayed frozen (every other tensor bit-identical to the initial model)."""
    root, recipe, z3, data, cache = setup
    rows = sft_rows(data, root / "sft.jsonl")
    out = root / "lora_sft_zero3"
    multi = launch(z3, recipe, out, rows, cache, *SFT, "model.lora=true", "training.learning_rate=1.0e-2")
    info = assert_backend(out, "zero3")
    assert info["algorithm"] == "sft" and info["lora"] and info["reference"] is None
    single, single_final = single_process_sft(recipe, root / "lora_sft_single", rows, cache, "model.lora=true",
                                              "training.learning_rate=1.0e-2")
    assert_same_sft(single, multi)
    final = load_file(out / "checkpoints" / "step-000002" / "model" / "model.safetensors")
    assert set(final) == set(initial_weights) and all(final[k].shape == initial_weights[k].shape for k in final)
    for weights in (final, single_final):
        changed = [k for k in initial_weights if not torch.equal(weights[k], initial_weights[k])]
        assert changed and all(k.split(".")[-2] in LORA_TARGETS for k in changed), changed
    assert_same_updates(single_final, final, initial_weights)


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
                     "algorithm.dpo.nll_weight=0.5")
    assert_backend(out, "zero3" if config == "zero3_partitioned" else "ddp")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert metrics[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and metrics[-1]["rewards/margins"] > 0
    exported = load_file(out / "checkpoints" / "step-000003" / "model" / "model.safetensors")
    assert set(exported) == set(initial_weights)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2", "zero3_offload"])
def test_shipped_deepspeed_configs_train(setup, initial_weights, config):
    """recipes/accelerate/zero2.yaml and zero3_offload.yaml on 2 CPU processes, unchanged but for
    --mixed_precision no (cpu_precision)."""
    root, recipe, _, data, cache = setup
    out = root / config
    metrics = launch(REPO / "recipes" / "accelerate" / f"{config}.yaml", recipe, out, data, cache)
    assert_backend(out, "zero2" if config == "zero2" else "zero3")
    check_run(metrics, out, initial_weights)


@pytest.mark.slow
def test_iterative_dpo_under_zero3(setup, initial_weights):
    """Rounds of sampling (hf engine, parameters gathered for generate), reward ranking and DPO on sharded weights."""
    root, recipe, z3, data, cache = setup
    out = root / "iterative_zero3"
    metrics = launch(z3, recipe, out, data, cache, "algorithm.name=iterative_dpo", "algorithm.iterative_dpo.round_prompts=4",
                     "algorithm.dpo.beta=0.5", "training.learning_rate=1.0e-2")
    assert_backend(out, "zero3", engine="hf")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    # 2 steps per round: the round's second step sees the first step's update against the round's reference
    assert [m["iterative/round"] for m in metrics] == [1, 1, 2]
    assert metrics[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and metrics[1]["rewards/margins"] != 0
    exported = load_file(out / "checkpoints" / "step-000003" / "model" / "model.safetensors")
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in initial_weights.items()}


@pytest.mark.slow
def test_micro_batches_equal_the_whole_step(setup, initial_weights, synthetic_data):
    """One step's prompts in one micro-batch or in several: the same losses, gradient norms and weight updates,
    under ZeRO-3 and under FSDP2 (accumulation over DTensor shards, the reference sharded too). The split is a
    token budget with unequal counts: process 0 holds two videos (each over the budget: 2 micro-batches),
    process 1 two images (1 micro-batch under the budget), so both run 2 (process 1 splits its) and nothing
    hangs (DeepSpeed's collectives time out after 2 minutes, the launch after 5). Under ZeRO-3 that is also
    gradient accumulation at DeepSpeed's own boundary (its engine configured for 2 micro-batches, the bound),
    the same micro-batches a fixed training.gradient_accumulation_steps=2 gives here (the fixed split itself:
    test_token_budget.py). DDP runs the same agreement logic with fewer collectives: no run of its own."""
    from .test_fsdp2 import FSDP2, assert_fsdp2

    root, recipe, z3, _, cache = setup
    images = rows_with_absolute_media(synthetic_data["counting"])
    videos = rows_with_absolute_media(synthetic_data["events"])
    data = root / "videos_and_images.jsonl"  # unshuffled, rows alternate between the 2 processes' shards
    data.write_text("".join(json.dumps(r) + "\n" for r in (videos[0], images[0], videos[1], images[1])))
    # prompts: images 83 tokens, videos 228-238 (16 frames); G=4 completions of 1-6 tokens: two image groups
    # (<= 214) fit the budget, a video group (>= 232) does not
    budget = "training.max_tokens_per_micro_batch=214"
    runs = {}
    for name, config, extra in (("zero3_whole", z3, []), ("zero3_budget", z3, [budget]),
                                ("fsdp2_budget", FSDP2, [budget])):
        out = root / f"micro_batches_{name}"
        runs[name] = (launch(config, recipe, out, data, cache, "data.shuffle=false", "data.max_prompt_length=1024",
                             "training.learning_rate=1.0e-2", *extra, timeout=300,
                             env_extra={"DEEPSPEED_TIMEOUT": "2"}), out)
        if name.startswith("zero3"):
            info = assert_backend(out, "zero3")
            assert info["deepspeed_gradient_accumulation_steps"] == (2 if name == "zero3_budget" else 1)
        else:
            assert assert_fsdp2(out)["reference"] is not None
    whole, out_whole = runs["zero3_whole"]
    assert all(m["train/micro_batches"] == 1 for m in whole)
    whole_final = load_file(out_whole / "checkpoints" / "step-000003" / "model" / "model.safetensors")
    for name in ("zero3_budget", "fsdp2_budget"):
        split, out_split = runs[name]
        for m in split:  # the premise: the processes' own splits disagreed and both ran 2
            assert (m["train/micro_batches"], m["train/micro_batches_fewest"], m["train/over_budget_groups"]) == (2, 1, 2), m
        for a, b in zip(whole, split, strict=True):
            for key in ("train/loss", "train/kl", "train/grad_norm", "rewards/total"):
                assert b[key] == pytest.approx(a[key], abs=2e-5, rel=1e-4), (name, a["step"], key)
        final = load_file(out_split / "checkpoints" / "step-000003" / "model" / "model.safetensors")
        assert_same_updates(whole_final, final, initial_weights)


@pytest.mark.slow
def test_deepspeed_accumulation_that_disagrees_with_the_recipe_stops_in_one_line(setup, tmp_path):
    root, recipe, _, data, cache = setup
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 1}))
    config = deepspeed_launch_config(tmp_path, ds_json, name="launch.yaml")
    out = root / "accumulate_mismatch"
    cmd = [*ACCELERATE_LAUNCH, "--config_file", str(config), "-m", "r1_mm.train", str(recipe),
           f"data.train_path={data}", f"training.output_dir={out}", "training.prompts_per_step=4",
           "training.gradient_accumulation_steps=2"]
    env = dict(__import__("os").environ, R1MM_CACHE=str(cache.parent))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1 and "training.gradient_accumulation_steps is 2" in errors.pop()  # same line on both ranks


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [[], ["rollout.top_p=0.9", "rollout.top_k=7"]], ids=["full", "truncated"])
def test_tiled_lm_head_equals_full_logits_under_zero3(setup, tmp_path, sampling):
    """Logprobs, entropy and every gradient of the tiled head vs the full-logits forward, on weights
    partitioned over 2 processes (the head gathered by TRL's kernel, or the truncated head, in forward
    and backward)."""
    _, recipe, z3, data, cache = setup
    result_file = tmp_path / "scores.json"
    cmd = [*ACCELERATE_LAUNCH, "--config_file", str(z3), str(REPO / "tests" / "scripts" / "zero3_token_scores.py"),
           str(result_file), str(recipe), f"data.train_path={data}", f"training.output_dir={tmp_path / 'run'}", *sampling]
    env = dict(__import__("os").environ, R1MM_CACHE=str(cache.parent))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(result_file.read_text())
    info = result["info"]
    assert (info["distributed_type"], info["zero_stage"], info["num_processes"]) == ("DEEPSPEED", 3, 2)
    assert info["partitioned_parameters"] == info["zero3_managed_parameters"] > 0
    assert result["lm_head_grad"] > 0 and result["truncated"] == bool(sampling)
    assert result["logps"] < 1e-5 and result["entropy"] < 1e-5 and result["grad_rel"] < 1e-4, result


@pytest.mark.slow
def test_distillation_under_zero3(setup, initial_weights):
    """algorithm: distill under the shipped ZeRO-3 config: the teacher (larger, another seed) is sharded as the
    policy is, both heads are gathered by the tiled divergence, and the reverse KL falls."""
    from r1_mm.models.tiny import TinySpec, tiny_model_path

    root, recipe, _, data, cache = setup
    teacher = tiny_model_path(TinySpec(small_vocab=True, seed=1, hidden_size=96, num_layers=3), cache_dir=cache)
    out = root / "distill_zero3"
    metrics = launch(REPO / "recipes" / "accelerate" / "zero3.yaml", recipe, out, data, cache,
                     "algorithm.name=distill", f"algorithm.distill.teacher={teacher}", "rewards.functions=[]")
    info = assert_backend(out, "zero3", engine="hf")
    assert info["teacher"] == "DeepSpeedEngine" and info["teacher_head_rows"] > 0 and info["distill_beta"] == 1.0
    assert [m["step"] for m in metrics] == [0, 1, 2]
    kl = [m["train/reverse_kl"] for m in metrics]
    assert kl[0] > 0.005 and kl[-1] < 0.8 * kl[0], kl
    exported = load_file(out / "checkpoints" / "step-000003" / "model" / "model.safetensors")
    assert set(exported) == set(initial_weights) and all(exported[k].shape == initial_weights[k].shape for k in exported)
    assert any(not torch.equal(exported[k], initial_weights[k]) for k in exported)
