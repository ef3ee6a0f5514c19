"""Token-budget micro-batches (training.max_tokens_per_micro_batch): the split as pure functions, and one
GRPO step on a video row and image rows whose accumulated gradient equals the unsplit step's (the
multi-process agreement on the count is in test_backends.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from r1_mm.config.recipe import ConfigError, accumulation, load_recipe
from r1_mm.trainers import grpo as grpo_module
from r1_mm.trainers.backend import budget_split, micro_batches, packed_tokens, split_to_count
from r1_mm.trainers.losses import LossNorm

from .conftest import REPO, rows_with_absolute_media


def _cfg(*extra):
    return load_recipe(None, ["training.prompts_per_step=6", *extra])


def test_budget_split_packs_consecutive_groups_within_the_budget():
    assert budget_split([3, 4, 2, 9, 1, 1], 7) == [range(0, 2), range(2, 3), range(3, 4), range(4, 6)]
    assert budget_split([3, 4], 7) == [range(0, 2)]  # exactly at the budget: together
    assert budget_split([], 7) == []
    split = micro_batches(_cfg("training.max_tokens_per_micro_batch=7"), [3, 4, 2, 9, 1, 1])
    assert split.parts == [range(0, 2), range(2, 3), range(3, 4), range(4, 6)]
    assert split.tokens == [7, 2, 9, 2] and split.over_budget == 1  # the 9-token group alone, not dropped
    assert split.metrics() == {"train/micro_batches": 4.0, "train/micro_batch_tokens_max": 9.0,
                               "train/over_budget_groups": 1.0}


@given(st.lists(st.integers(1, 50), min_size=1, max_size=12), st.integers(1, 60))
def test_budget_split_properties(tokens, budget):
    parts = budget_split(tokens, budget)
    assert [i for r in parts for i in r] == list(range(len(tokens)))  # every group once, whole, in order
    for r in parts:
        load = sum(tokens[i] for i in r)
        assert load <= budget or len(r) == 1  # over the budget only a group alone
    for a, b in zip(parts, parts[1:], strict=False):  # greedy: the next group did not fit
        assert sum(tokens[i] for i in a) + tokens[b.start] > budget
    for count in range(len(parts), len(tokens) + 1):  # another process needs more micro-batches
        more = split_to_count(parts, tokens, count)
        assert len(more) == count and [i for r in more for i in r] == list(range(len(tokens)))
        assert all(len(r) >= 1 and (sum(tokens[i] for i in r) <= budget or len(r) == 1) for r in more)


def test_split_to_count_cuts_the_heaviest_part_evenly_and_refuses_the_impossible():
    assert split_to_count([range(0, 1), range(1, 4)], [9, 2, 2, 4], 3) == [range(0, 1), range(1, 3), range(3, 4)]
    with pytest.raises(ValueError, match="cannot fill 3 micro-batches"):
        split_to_count([range(0, 2)], [1, 1], 3)


def test_fixed_split_unchanged_and_the_field_validates():
    split = micro_batches(_cfg("training.micro_batch_size=2"), [5, 1, 1, 1, 1, 1])
    assert split.parts == [range(0, 2), range(2, 4), range(4, 6)] and split.tokens == [6, 2, 2]
    assert accumulation(_cfg("training.max_tokens_per_micro_batch=100").training) == (6, 1)  # the bound
    with pytest.raises(ConfigError, match="leave training.gradient_accumulation_steps and training.micro_batch_size"):
        _cfg("training.max_tokens_per_micro_batch=100", "training.micro_batch_size=2")
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch must be >= 1"):
        _cfg("training.max_tokens_per_micro_batch=0")
    assert packed_tokens(10, [3, 5], "grouped") == 18 and packed_tokens(10, [3, 5], "naive") == 30


@pytest.fixture(scope="module")
def step(tmp_path_factory, synthetic_data, tiny_cache):
    """A GRPO trainer and one collected step of 4 prompts: an image, a video, two images (G=3)."""
    root = tmp_path_factory.mktemp("token_budget")
    images = rows_with_absolute_media(synthetic_data["counting"])
    videos = rows_with_absolute_media(synthetic_data["events"])
    data = root / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (images[0], videos[0], images[1], images[2])))
    mp = pytest.MonkeyPatch()
    mp.setenv("R1MM_CACHE", str(tiny_cache.parent))
    cfg = load_recipe(None, [
        "model.name_or_path=tiny:qwen2_5_vl:small", f"data.train_path={data}", f"training.output_dir={root / 'run'}",
        "data.format_instruction=null", "media.max_pixels=3136", "media.min_pixels=3136", "data.shuffle=false",
        "media.video_max_pixels=25088", "media.max_frames=8", "media.min_frames=8", "data.max_prompt_length=2048",
        "rollout.num_generations=3", "rollout.max_completion_length=6", "training.prompts_per_step=4",
        "training.max_steps=1", "logging.progress_bar=false", "algorithm.grpo.loss_type=dapo",
        f"rewards.functions=[{{name: '{REPO / 'tests' / 'plugins' / 'test_rewards.py'}:length_reward'}}]",
        "algorithm.grpo.beta=0.04"])
    trainer = grpo_module.GRPOTrainer(cfg)
    exp = trainer.collect()
    trainer.compute_advantages(exp)
    yield trainer, exp
    trainer.close()
    mp.undo()


def _step_gradient(trainer, exp, monkeypatch, budget):
    """The accumulated gradient of one update (the optimizer does not step) and the update's metrics."""
    grads, splits = [], []

    def capture(learner, max_grad_norm):
        grads.append({n: p.grad.detach().clone() for n, p in learner.unwrapped.named_parameters() if p.grad is not None})
        learner.optimizer.zero_grad(set_to_none=True)

    def spy(cfg, tokens, accelerator=None):
        splits.append(micro_batches(cfg, tokens, accelerator))
        return splits[-1]

    monkeypatch.setattr(grpo_module, "optimizer_step", capture)
    monkeypatch.setattr(grpo_module, "micro_batches", spy)
    monkeypatch.setattr(trainer.cfg.training, "max_tokens_per_micro_batch", budget)
    metrics = trainer.update(exp)
    (grad,) = grads
    return grad, splits[0], metrics


def _budget(trainer, exp):
    """Two image groups fit; the video group is over it (so it runs alone)."""
    tokens = trainer._group_tokens(exp)
    video = tokens[1]
    budget = tokens[2] + tokens[3]
    assert video > budget and tokens[0] + video > budget, tokens  # the premise of the split below
    return budget


def test_token_budget_step_gradient_equals_the_whole_step(step, monkeypatch):
    trainer, exp = step
    assert [bool(s.videos) for s in exp.samples] == [False, True, False, False]
    whole, whole_split, whole_metrics = _step_gradient(trainer, exp, monkeypatch, None)
    assert whole_split.parts == [range(0, 4)]
    budget = _budget(trainer, exp)
    split_grad, split, metrics = _step_gradient(trainer, exp, monkeypatch, budget)
    # the premise: three micro-batches of 1, 1 and 2 prompts (3, 3, 6 completions), the video alone over budget
    assert split.parts == [range(0, 1), range(1, 2), range(2, 4)] and split.over_budget == 1
    assert metrics["train/micro_batches"] == 3 and metrics["train/over_budget_groups"] == 1
    assert metrics["train/micro_batch_tokens_max"] == max(split.tokens) > budget
    assert whole_metrics["train/micro_batches"] == 1
    assert set(whole) == set(split_grad) and len(whole) > 10
    scale = max(float(g.abs().max()) for g in whole.values())
    assert scale > 1e-3  # a real gradient
    worst = max(float((split_grad[n] - whole[n]).abs().max()) for n in whole)
    assert worst <= 1e-6, (worst, scale)
    assert metrics["train/loss"] == pytest.approx(whole_metrics["train/loss"], abs=1e-6)


def test_a_per_micro_batch_normaliser_would_fail_the_gradient_check(step, monkeypatch):
    """The negative: each micro-batch normalised by its own tokens instead of the step's."""
    trainer, exp = step
    whole, _, _ = _step_gradient(trainer, exp, monkeypatch, None)
    real_loss = grpo_module.policy_loss

    def own_norm(logps, behaviour, adv, mask, settings, **kw):
        kw["norm"] = LossNorm.of(mask)
        return real_loss(logps, behaviour, adv, mask, settings, **kw)

    monkeypatch.setattr(grpo_module, "policy_loss", own_norm)
    wrong, split, _ = _step_gradient(trainer, exp, monkeypatch, _budget(trainer, exp))
    assert len(split) == 3
    worst = max(float((wrong[n] - whole[n]).abs().max()) for n in whole)
    assert worst > 1e-4, worst
