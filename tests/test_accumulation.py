"""Gradient accumulation: a step split into micro-batches trains exactly like the unsplit step
(GRPO every loss type, DPO with the NLL term), as pure math and end to end (one process; the
DeepSpeed form is in test_backends.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from r1_mm.config.recipe import ConfigError, accumulation, load_recipe
from r1_mm.trainers.grpo import GRPOTrainer
from r1_mm.trainers.losses import LossNorm, LossSettings, policy_loss
from r1_mm.trainers.preference import PreferenceTrainer
from r1_mm.trainers.preference_batch import PairRows
from r1_mm.trainers.preference_losses import PreferenceLossSettings, PreferenceNorm, preference_loss

from .conftest import REPO, assert_same_updates


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batch_shares_sum_to_the_step_loss_and_gradient(loss_type):
    gen = torch.Generator().manual_seed(0)
    n, c = 8, 6
    logps = (torch.randn(n, c, generator=gen) * 0.1 - 1).requires_grad_()
    old = logps.detach() + torch.randn(n, c, generator=gen) * 0.05
    ref = logps.detach() + torch.randn(n, c, generator=gen) * 0.05
    adv = torch.randn(n, generator=gen)
    mask = (torch.arange(c)[None, :] < torch.randint(1, c + 1, (n, 1), generator=gen)).long()
    settings = LossSettings(loss_type=loss_type, beta=0.04, max_completion_length=c)
    full = policy_loss(logps, old, adv, mask, settings, ref_logps=ref, num_items=13.0).loss
    (g_full,) = torch.autograd.grad(full, logps)
    norm = LossNorm.of(mask, num_items=13.0)
    shares = [policy_loss(logps[s], old[s], adv[s], mask[s], settings, ref_logps=ref[s], norm=norm).loss
              for s in (slice(0, 3), slice(3, 8))]
    (g_split,) = torch.autograd.grad(sum(shares), logps)
    torch.testing.assert_close(sum(shares), full, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_split, g_full, atol=1e-7, rtol=0)


def test_preference_shares_sum_to_the_step_loss():
    gen = torch.Generator().manual_seed(1)
    logps = torch.randn(8, 5, generator=gen) - 2  # 4 pairs: chosen, rejected interleaved
    mask = (torch.arange(5)[None, :] < torch.randint(1, 6, (8, 1), generator=gen)).long()
    ref_c, ref_r = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    settings = PreferenceLossSettings(loss_type="sigmoid", beta=0.1, nll_weight=0.5)
    rows = PairRows(chosen=torch.arange(4) * 2, rejected=torch.arange(4) * 2 + 1)
    full = preference_loss(logps, mask, rows, ref_c, ref_r, settings).loss
    norm = PreferenceNorm.of(mask, rows)
    shares = []
    for a, b in ((0, 1), (1, 4)):
        part = PairRows(chosen=torch.arange(b - a) * 2, rejected=torch.arange(b - a) * 2 + 1)
        shares.append(preference_loss(logps[2 * a:2 * b], mask[2 * a:2 * b], part, ref_c[a:b], ref_r[a:b], settings,
                                      norm).loss)
    torch.testing.assert_close(sum(shares), full, atol=1e-6, rtol=0)


def test_accumulation_fields_validate_at_load():
    assert accumulation(load_recipe(None, ["training.prompts_per_step=6", "training.micro_batch_size=2"]).training) == (3, 2)
    assert accumulation(load_recipe(None, ["training.prompts_per_step=6",
                                           "training.gradient_accumulation_steps=3"]).training) == (3, 2)
    with pytest.raises(ConfigError, match="must divide training.prompts_per_step"):
        load_recipe(None, ["training.prompts_per_step=6", "training.gradient_accumulation_steps=4"])
    with pytest.raises(ConfigError, match="must equal training.prompts_per_step"):
        load_recipe(None, ["training.prompts_per_step=6", "training.gradient_accumulation_steps=2",
                           "training.micro_batch_size=2"])


def _grpo(tmp_path, data, name, *extra):
    return load_recipe(None, [
        "model.name_or_path=tiny:qwen2_5_vl:small", f"data.train_path={data}", f"training.output_dir={tmp_path / name}",
        "data.format_instruction=null", "media.max_pixels=3136", "media.min_pixels=3136", "data.shuffle=false",
        "rollout.num_generations=4", "rollout.max_completion_length=4", "training.prompts_per_step=4",
        "training.max_steps=2", "training.learning_rate=1e-2", "logging.progress_bar=false",
        f"rewards.functions=[{{name: '{REPO / 'tests' / 'plugins' / 'test_rewards.py'}:length_reward'}}]",
        "algorithm.grpo.beta=0.04", *extra])


def _final(run) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "step-000002" / "model" / "model.safetensors")


def _start(tiny_cache) -> dict[str, torch.Tensor]:
    from r1_mm.models.tiny import TinySpec, tiny_model_path

    return load_file(tiny_model_path(TinySpec(small_vocab=True), cache_dir=tiny_cache) / "model.safetensors")


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_accumulated_equals_unaccumulated(tmp_path, synthetic_data, tiny_cache, monkeypatch, loss_type):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    data = synthetic_data["counting"]
    runs = {}
    for name, extra in (("whole", []), ("split", ["training.gradient_accumulation_steps=4"])):
        cfg = _grpo(tmp_path, data, name, f"algorithm.grpo.loss_type={loss_type}", "algorithm.grpo.num_iterations=2", *extra)
        GRPOTrainer(cfg).train()
        runs[name] = tmp_path / name
    info = json.loads((runs["split"] / "run_info.json").read_text())
    assert (info["gradient_accumulation_steps"], info["micro_batch_size"]) == (4, 1)  # the premise: really split
    whole, split = _metrics(runs["whole"]), _metrics(runs["split"])
    for a, b in zip(whole, split, strict=True):
        for key in ("train/loss", "train/kl", "train/entropy", "train/grad_norm", "rewards/total"):
            assert b[key] == pytest.approx(a[key], abs=2e-5, rel=1e-4), (a["step"], key)
    assert whole[-1]["train/kl"] > 0  # the weights moved, so equal weights below mean equal updates
    assert_same_updates(_final(runs["whole"]), _final(runs["split"]), _start(tiny_cache))


def test_dpo_accumulated_equals_unaccumulated(tmp_path, synthetic_data, tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    data = synthetic_data["counting"]
    pairs = tmp_path / "pairs.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    pairs.write_text("".join(json.dumps({**r, "image": str(data.parent / r["image"]), "chosen": str(r["solution"]),
                                         "rejected": "7 squares " * (i % 3 + 1)}) + "\n" for i, r in enumerate(rows)))
    runs = {}
    # budget: pairs of 78-86 tokens (71-token prompts), so 160 packs 2, 1, 1 pairs, then 1, 1, 2
    for name, extra in (("whole", []), ("split", ["training.micro_batch_size=1"]),
                        ("budget", ["training.max_tokens_per_micro_batch=160"])):
        cfg = _grpo(tmp_path, pairs, name, "algorithm.name=dpo", "algorithm.dpo.nll_weight=0.5", *extra)
        PreferenceTrainer(cfg).train()
        runs[name] = tmp_path / name
    whole = _metrics(runs["whole"])
    assert [m["train/micro_batches"] for m in _metrics(runs["budget"])] == [3, 3]  # the premise: uneven splits
    for other in ("split", "budget"):
        for a, b in zip(whole, _metrics(runs[other]), strict=True):
            for key in ("train/loss", "train/nll", "rewards/margins", "train/entropy", "train/grad_norm"):
                assert b[key] == pytest.approx(a[key], abs=2e-5, rel=1e-4), (other, a["step"], key)
        assert_same_updates(_final(runs["whole"]), _final(runs[other]), _start(tiny_cache))
    assert whole[-1]["rewards/margins"] != 0
