"""FSDP2 (accelerate's ``fully_shard``, recipes/accelerate/fsdp2.yaml) on 2 CPU processes over gloo, as the
alternative to ZeRO-3: the premise first (run_info.json: accelerate ran FSDP version 2, and on EACH process
every policy and reference parameter is a DTensor holding about half of the tensor), then GRPO equal to the
same run under DDP (the unsharded back-end: same data, same seeds, so the same rollouts), the exported model
holding the full weights, an exact resume from an FSDP2 checkpoint (sharded state, moved reference), and the
vLLM weight sync of the gathered weights (colocated engines).
Slow: real launches, each with a deadline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO, assert_same_updates
from .test_backends import RECIPE, launch

FSDP2 = REPO / "recipes" / "accelerate" / "fsdp2.yaml"
DDP = REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"
COMPARED = ("train/loss", "train/kl", "train/grad_norm", "rewards/total", "completions/mean_length")
TIMEOUT = 420  # seconds per launch; a hang fails the test instead of blocking the suite


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synthetic_data, tiny_cache):
    root = tmp_path_factory.mktemp("fsdp2")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE)
    return root, recipe, synthetic_data["counting"], tiny_cache


@pytest.fixture(scope="module")
def initial_weights(tiny_cache):
    from r1_mm.models.tiny import TinySpec, tiny_model_path

    return load_file(tiny_model_path(TinySpec(small_vocab=True), cache_dir=tiny_cache) / "model.safetensors")


def assert_fsdp2(out) -> dict:
    """The premise, from the run's own run_info.json: accelerate's FSDP with fsdp_version 2, the policy an
    FSDP2 module cut into units, and on each of the 2 processes every parameter of the policy (and of the
    reference) a DTensor whose local shard is about half the full tensor."""
    info = json.loads((out / "run_info.json").read_text())
    assert (info["distributed_type"], info["fsdp_version"], info["num_processes"]) == ("FSDP", 2, 2), info
    assert info["zero_stage"] is None and info["fsdp_root_is_fsdp_module"] and info["fsdp_units"] > 2, info
    assert info["learner_engine"].startswith("FSDP"), info  # fully_shard's class, not DDP / DeepSpeedEngine
    assert len(info["fsdp_per_process"]) == 2
    for rank in info["fsdp_per_process"]:
        assert rank["dtensor_parameters"] == rank["parameters"] > 0, rank
        assert rank["partitioned_parameters"] > 0, rank
        assert rank["local_parameter_elements"] <= rank["full_parameter_elements"] // 2 + 4096, rank
    if info["reference"] is not None:
        assert info["reference_dtensor_parameters"] == info["reference_parameters"] > 0, info
    return info


def final_export(out, step: int = 3) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step-{step:06d}" / "model" / "model.safetensors")


@pytest.mark.slow
def test_fsdp2_grpo_equals_ddp_exports_full_weights_and_resumes_exactly(setup, initial_weights):
    """GRPO with a reference (beta > 0) synced into the policy after step 2 (so the step-2 checkpoint carries
    the moved reference): 3 steps under DDP and under FSDP2 give the same losses, KL, gradient norms and
    weight updates; the FSDP2 checkpoint's model/ holds full, unsharded tensors (the iterator that also feeds
    the vLLM engines); resumed from step 2, the FSDP2 run logs the uninterrupted run's step 3."""
    root, recipe, data, cache = setup
    common = ("data.shuffle=false", "training.save_steps=2", "algorithm.grpo.ref_sync_steps=2",
              "model.gradient_checkpointing=true")
    runs = {}
    for name, config in (("fsdp2", FSDP2), ("ddp", DDP)):
        out = root / name
        runs[name] = launch(config, recipe, out, data, cache, *common, timeout=TIMEOUT)
    info = assert_fsdp2(root / "fsdp2")
    assert info["reference"] is not None  # beta > 0: a separate reference, sharded too
    ddp_info = json.loads((root / "ddp" / "run_info.json").read_text())
    assert (ddp_info["distributed_type"], ddp_info["partitioned_parameters"]) == ("MULTI_CPU", 0)

    ddp, fsdp = runs["ddp"], runs["fsdp2"]
    assert [m["step"] for m in fsdp] == [0, 1, 2]
    # policy == reference at step 1; apart after it; the reference synced to the policy after step 2 (ref_sync_steps,
    # alpha 1), so step 3's KL is 0 again, and only if the resumed run restores that moved reference
    assert [m["train/kl"] for m in fsdp] == pytest.approx([0.0, fsdp[1]["train/kl"], 0.0], abs=1e-6)
    assert fsdp[1]["train/kl"] > 1e-3
    for a, b in zip(ddp, fsdp, strict=True):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-5), (a["step"], key, a[key], b[key])

    exported = final_export(root / "fsdp2")
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in initial_weights.items()}  # gathered
    assert_same_updates(final_export(root / "ddp"), exported, initial_weights)
    reference = load_file(root / "fsdp2" / "checkpoints" / "step-000002" / "reference.safetensors")
    # the reference gathered too (in-memory names): full tensors, as many elements as the model (a tied head once)
    ref_numel, initial_numel = sum(v.numel() for v in reference.values()), sum(v.numel() for v in initial_weights.values())
    assert ref_numel in (initial_numel, initial_numel - initial_weights["lm_head.weight"].numel())

    resumed = root / "fsdp2_resumed"
    resumed.mkdir()
    shutil.copytree(root / "fsdp2" / "checkpoints" / "step-000002", resumed / "step-000002")
    metrics = launch(FSDP2, recipe, root / "fsdp2_resumed_run", data, cache, *common,
                     f"training.resume_from={resumed / 'step-000002'}", timeout=TIMEOUT)
    assert_fsdp2(root / "fsdp2_resumed_run")
    assert [m["step"] for m in metrics] == [2]
    for key in COMPARED:
        assert metrics[0][key] == pytest.approx(fsdp[2][key], abs=1e-5, rel=1e-5), key
    again = final_export(root / "fsdp2_resumed_run")
    assert max(float((again[k] - exported[k]).abs().max()) for k in exported) < 1e-6


@pytest.mark.slow
def test_dpo_under_fsdp2(setup, initial_weights):
    """Every algorithm runs under FSDP2: DPO (its reference sharded like the policy) for 2 steps."""
    root, recipe, data, cache = setup
    pairs = root / "pairs.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for i, row in enumerate(rows):
        row.update(image=str(data.parent / row["image"]), chosen=str(row["solution"]), rejected=str(i % 3 + 5))
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = root / "dpo"
    metrics = launch(FSDP2, recipe, out, pairs, cache, "algorithm.name=dpo", "training.max_steps=2",
                     "algorithm.dpo.nll_weight=0.5", timeout=TIMEOUT)
    info = assert_fsdp2(out)
    assert info["reference"] is not None
    assert [m["step"] for m in metrics] == [0, 1]
    assert metrics[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and metrics[-1]["rewards/margins"] != 0
    exported = final_export(out, 2)
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in initial_weights.items()}
    assert any(not torch.equal(exported[k], initial_weights[k]) for k in initial_weights)


@pytest.mark.slow
def test_fsdp2_lora_weight_sync_to_colocated_vllm(setup, initial_weights):
    """LoRA under FSDP2 with one vLLM engine per process: after every step both processes gather the DTensor
    shards (the export iterator, bucket by bucket; the adapters' units unsharded for PEFT's merge) and load the
    merged full weights, so the engines' sampling logprobs keep matching the learner's on weights that moved
    (lr 1e-2); the adapter-disabled policy is the reference; the export holds the merged weights."""
    root, recipe, data, cache = setup
    out = root / "colocate"
    metrics = launch(FSDP2, recipe, out, data, cache, "rollout.engine=vllm_colocate", "rollout.vllm_dtype=float32", "model.lora=true",
                     "rollout.vllm_max_model_len=2048", "rollout.weight_sync_bucket_mb=1",
                     "training.learning_rate=1.0e-2", timeout=TIMEOUT)
    info = assert_fsdp2(out)
    assert info["rollout_engine"] == "vllm_colocate"
    assert info["lora"] and info["reference"] is None  # the adapter-disabled policy is the reference
    assert metrics[-1]["train/kl"] > 1e-2  # the weights really moved, so a stale engine would show
    for m in metrics:  # float32 engine and learner: 1-2e-7 measured here; a step-stale engine is off by ~KL
        assert m["rollout/logprob_abs_diff_mean"] < 1e-5 and m["rollout/is_dropped_frac"] == 0.0, m
    exported = final_export(out)
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in initial_weights.items()}
    changed = [k for k in initial_weights if not torch.equal(exported[k], initial_weights[k])]
    # LoRA touches only the targeted language-model projections; the merge put them into the base weights
    assert changed and all(k.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"} for k in changed)


@pytest.mark.slow
def test_sft_under_fsdp2_with_gradient_accumulation_equals_one_process(setup, initial_weights, synthetic_data):
    """algorithm: sft under FSDP2, each process's 2 prompts as 2 micro-batches (gradient accumulation over the
    DTensor shards), equals the same run on one process in one micro-batch of 4: gradient norms per step and
    the weights exported after 2 steps. The premise: FSDP2 sharded every parameter, SFT ran, 2 micro-batches."""
    from .test_backends import SFT, assert_same_sft, sft_rows, single_process_sft

    root, recipe, _, cache = setup
    rows = sft_rows(synthetic_data["counting"], root / "sft.jsonl")
    out = root / "sft"
    multi = launch(FSDP2, recipe, out, rows, cache, *SFT, "training.gradient_accumulation_steps=2", timeout=TIMEOUT)
    info = assert_fsdp2(out)
    assert info["algorithm"] == "sft" and info["reference"] is None and info["gradient_accumulation_steps"] == 2
    assert all(m["train/micro_batches"] == 2 for m in multi), multi
    single, single_final = single_process_sft(recipe, root / "sft_single", rows, cache)
    assert all(m["train/micro_batches"] == 1 for m in single)
    assert_same_sft(single, multi)
    final = final_export(out, 2)
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in initial_weights.items()}  # gathered
    assert_same_updates(single_final, final, initial_weights)
