"""End-to-end GRPO runs on the tiny model (one process): knobs that only show in a whole step, and failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r1_mm.config.recipe import load_recipe
from r1_mm.rewards.registry import RewardError
from r1_mm.run.tracking import read_metrics
from r1_mm.trainers import grpo as grpo_module
from r1_mm.trainers.backend import reference_model
from r1_mm.trainers.grpo import GRPOTrainer, NonFiniteLossError

from .conftest import REPO

PLUGINS = REPO / "tests" / "plugins"


def recipe(tmp_path: Path, data: Path, *overrides: str):
    return load_recipe(None, [
        "model.name_or_path=tiny:qwen2_5_vl:small", f"data.train_path={data}", f"training.output_dir={tmp_path / 'run'}",
        "data.format_instruction=null", "media.max_pixels=3136", "media.min_pixels=3136",
        "rollout.num_generations=4", "rollout.max_completion_length=3", "training.prompts_per_step=2",
        "training.max_steps=2", "training.learning_rate=1e-3", "logging.progress_bar=false",
        "rewards.functions=[{name: numeric, kwargs: {require_tag: false}}]", *overrides])


@pytest.fixture(autouse=True)
def _cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))


def test_reward_that_raises_names_function_and_rows(tmp_path, synthetic_data):
    # unshuffled: row 1 is in step 0's batch whatever the shuffle's seed derivation (with shuffling, only some seeds
    # reach it within the 2 steps x 2 prompts)
    cfg = recipe(tmp_path, synthetic_data["counting"], "data.shuffle=false",
                 f"rewards.functions=[{{name: '{PLUGINS}/faulty.py:fails_on_row_1'}}]")
    with pytest.raises(RewardError, match=r"reward '.*faulty.py:fails_on_row_1' failed on rows \[.*counting-1.*\]"):
        GRPOTrainer(cfg).train()


def test_reward_failures_scored_none_and_counted_by_policy(tmp_path, synthetic_data):
    name = f"{PLUGINS}/faulty.py:fails_on_row_1"
    cfg = recipe(tmp_path, synthetic_data["counting"], "rewards.on_error=none", "data.shuffle=false",
                 f"rewards.functions=[{{name: numeric, kwargs: {{require_tag: false}}}}, {{name: '{name}'}}]")
    GRPOTrainer(cfg).train()
    metrics = read_metrics(cfg.training.output_dir)
    # a plugin's metrics are named by its function, not its file path
    assert not [key for m in metrics for key in m if "faulty.py" in key]
    assert metrics[-1]["rewards/fails_on_row_1/failures"] >= 1  # cumulative count, step 0 holds row 1
    assert metrics[0]["rewards/fails_on_row_1/applicable"] == 0.0  # the failing batch scored None, not 0
    assert metrics[0]["rewards/numeric/applicable"] == 1.0


def test_nonfinite_losses_skip_then_save_and_stop(tmp_path, synthetic_data, monkeypatch):
    """Fault injection: the loss is made NaN (what a bf16 overflow does on GPU; CPU float32 won't overflow here)."""
    real = grpo_module.policy_loss

    def nan_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(grpo_module, "policy_loss", nan_loss)
    cfg = recipe(tmp_path, synthetic_data["counting"], "training.max_steps=5", "training.max_nonfinite_steps=2")
    trainer = GRPOTrainer(cfg)
    before = {k: v.clone() for k, v in trainer.learner.unwrapped.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite losses at step 1; checkpoint saved"):
        trainer.train()
    after = trainer.learner.unwrapped.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update was applied
    metrics = read_metrics(cfg.training.output_dir)
    assert [m["step"] for m in metrics] == [0] and metrics[0]["train/nonfinite_skipped"] == 1.0
    state = json.loads((Path(cfg.training.output_dir) / "checkpoints" / "step-000001" / "trainer_state.json").read_text())
    assert state["nonfinite_in_a_row"] == 2


def test_dynamic_sampling_replaces_flat_groups(tmp_path, synthetic_data):
    # a reward that is flat (always 1) on even rows: those groups carry no signal and are resampled
    cfg = recipe(tmp_path, synthetic_data["counting"], "algorithm.grpo.dynamic_sampling=true", "training.max_steps=1",
                 f"rewards.functions=[{{name: '{PLUGINS}/faulty.py:flat_on_even_rows'}}]")
    trainer = GRPOTrainer(cfg)
    exp = trainer.collect()
    assert exp.stats["dynamic_sampling/resampled_groups"] >= 1
    assert len(exp.samples) == 2 and len(exp.completions) == 8
    # replacements keep their slot's group id; every completion was sampled by the step-0 policy (synchronous)
    assert exp.batch.group_ids.tolist() == [0] * 4 + [1] * 4 and exp.batch.policy_version.tolist() == [0] * 8
    assert trainer.stream.report.counts()["data/rows_prepared"] > 2  # refills came from the stream


def test_temporal_contrast_scores_shuffled_frames(tmp_path, synthetic_data):
    cfg = recipe(tmp_path, synthetic_data["events"], "algorithm.grpo.temporal_contrast=true",
                 "algorithm.grpo.temporal_reward=accuracy", "media.max_frames=4", "media.min_frames=4",
                 "rewards.functions=[{name: accuracy}]", "training.max_steps=1")
    GRPOTrainer(cfg).train()
    m = read_metrics(cfg.training.output_dir)[0]
    assert m["temporal/video_prompts"] == 2 and 0.0 <= m["temporal/bonus_rate"] <= 1.0


def test_num_iterations_and_reference_sync(tmp_path, synthetic_data):
    cfg = recipe(tmp_path, synthetic_data["counting"], "algorithm.grpo.num_iterations=2", "algorithm.grpo.ref_sync_steps=2",
                 "algorithm.grpo.beta=0.1", f"rewards.functions=[{{name: '{PLUGINS}/faulty.py:alternating'}}]")
    trainer = GRPOTrainer(cfg)
    trainer.train()
    policy = trainer.learner.unwrapped.state_dict()
    with reference_model(trainer.learner) as ref:
        ref_state = ref.state_dict()
    # after step 2 the reference was synced to the policy (alpha = 1): equal again
    assert all(torch.equal(policy[k], ref_state[k]) for k in policy)
    metrics = read_metrics(cfg.training.output_dir)
    assert metrics[1]["train/kl"] > 0  # the policy had moved away from the reference before the sync


def test_reference_not_synced_without_ref_sync_steps(tmp_path, synthetic_data):
    cfg = recipe(tmp_path, synthetic_data["counting"], "algorithm.grpo.beta=0.1",
                 f"rewards.functions=[{{name: '{PLUGINS}/faulty.py:alternating'}}]")
    trainer = GRPOTrainer(cfg)
    trainer.train()
    policy = trainer.learner.unwrapped.state_dict()
    with reference_model(trainer.learner) as ref:
        ref_state = ref.state_dict()
    assert not all(torch.equal(policy[k], ref_state[k]) for k in policy)


def test_image_multi_image_and_video_prompts_in_one_run(tmp_path, synthetic_data):
    """One data file mixing single images, image pairs and videos; by_problem_type scores each row."""
    rows = []
    for task in ("counting", "multi_image", "events"):
        path = synthetic_data[task]
        for line in path.read_text().splitlines()[:2]:
            row = json.loads(line)
            for key in ("image", "video"):
                if isinstance(row.get(key), str):
                    row[key] = str(path.parent / row[key])
            if isinstance(row.get("images"), list):
                row["images"] = [str(path.parent / p) for p in row["images"]]
            rows.append(row)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # 2 rows of each kind
    cfg = recipe(tmp_path, mixed, "training.prompts_per_step=6", "training.max_steps=2", "media.max_frames=4",
                 "rewards.functions=[{name: by_problem_type, kwargs: {require_tag: false}}]", "data.shuffle=false")
    trainer = GRPOTrainer(cfg)
    exp = trainer.collect()
    kinds = {("video" if s.videos else "images" if len(s.images) > 1 else "image") for s in exp.samples}
    assert kinds == {"image", "images", "video"}
    trainer.train()
    assert [m["step"] for m in read_metrics(cfg.training.output_dir)] == [0, 1]


def test_eval_in_the_loop_and_offline_eval_agree(tmp_path, synthetic_data):
    from r1_mm.cli import main

    data = synthetic_data["counting"]
    cfg = recipe(tmp_path, data, f"data.eval_path={data}", "training.eval_steps=2", "training.max_steps=4",
                 "training.eval_max_rows=4")
    GRPOTrainer(cfg).train()
    metrics = read_metrics(cfg.training.output_dir)
    evals = [m for m in metrics if "eval/rewards/total" in m]
    assert [m["step"] for m in evals] == [1, 3] and all(m["eval/prompts"] == 4 for m in evals)
    recipe_file = Path(cfg.training.output_dir) / "recipe.resolved.yaml"
    checkpoint = Path(cfg.training.output_dir) / "checkpoints" / "step-000004"
    assert main(["eval", str(recipe_file), "--checkpoint", str(checkpoint)]) == 0
    offline = json.loads((checkpoint / "eval.json").read_text())
    # greedy decoding of the same weights: the offline score equals the last in-run score
    assert offline["eval/rewards/total"] == pytest.approx(evals[-1]["eval/rewards/total"])
    assert offline["eval/completions/mean_length"] == pytest.approx(evals[-1]["eval/completions/mean_length"])
