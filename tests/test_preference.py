"""Preference learning: DPO losses equal TRL's DPOTrainer on identical image batches; DPO and TPO
train end to end on image and video rows; `r1-mm tpo build` makes pairs from the synthetic event videos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from r1_mm.config.recipe import DataConfig, MediaConfig, load_recipe
from r1_mm.data import PromptBuilder
from r1_mm.data.loading import DataError, default_media_root, read_rows
from r1_mm.models.forward.scoring import score_completions
from r1_mm.run.tracking import read_metrics
from r1_mm.trainers.preference import PreferenceTrainer
from r1_mm.trainers.preference_batch import PairRows, PreferenceBatch
from r1_mm.trainers.preference_losses import PreferenceLossSettings, preference_loss

CASES = [("sigmoid", 0.0, 0.0), ("hinge", 0.0, 0.0), ("ipo", 0.0, 0.0), ("robust", 0.2, 0.0), ("sigmoid", 0.0, 0.5)]


@pytest.fixture(scope="module")
def image_pairs(tiny_path, synthetic_data):
    path = tiny_path("qwen2_5_vl")
    processor = AutoProcessor.from_pretrained(path)
    data = synthetic_data["counting"]
    builder = PromptBuilder(processor, DataConfig(), MediaConfig(), default_media_root(data))
    samples = [builder.prepare(row, i) for i, row in enumerate(read_rows(data)[:2])]
    gen = torch.Generator().manual_seed(0)
    completions = [torch.randint(0, 400, (n,), generator=gen).tolist() for n in (5, 3, 4, 6)]  # c0, r0, c1, r1
    return path, processor, samples, completions


def trl_inputs(processor, samples, completions):
    """TRL's DPO batch: rows [chosen_0, chosen_1, rejected_0, rejected_1] = prompt + completion, right-padded."""
    order = [(0, 0), (1, 2), (0, 1), (1, 3)]  # (sample, completion) for chosen rows then rejected rows
    rows = [torch.cat([samples[s].inputs["input_ids"][0], torch.tensor(completions[c])]) for s, c in order]
    width = max(len(r) for r in rows)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.full((4, width), pad)
    attention, completion, mm = (torch.zeros((4, width), dtype=torch.long) for _ in range(3))
    for i, ((s, _), row) in enumerate(zip(order, rows, strict=True)):
        p = samples[s].inputs["input_ids"].shape[1]
        input_ids[i, :len(row)] = row
        attention[i, :len(row)] = 1
        completion[i, p:len(row)] = 1
        mm[i, :p] = samples[s].inputs["mm_token_type_ids"][0]
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion,
            "mm_token_type_ids": mm,
            "pixel_values": torch.cat([samples[s].inputs["pixel_values"] for s, _ in order]),
            "image_grid_thw": torch.cat([samples[s].inputs["image_grid_thw"] for s, _ in order])}


@pytest.mark.parametrize(("loss_type", "smoothing", "nll"), CASES)
def test_dpo_losses_equal_trl(image_pairs, tmp_path, loss_type, smoothing, nll):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    path, processor, samples, completions = image_pairs
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path)
    with torch.no_grad():  # policy != reference, so the log-ratios are not all zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref = AutoModelForImageTextToText.from_pretrained(path)
    beta = 0.3
    losses = [loss_type] + (["sft"] if nll else [])
    config = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], beta=beta, loss_type=losses,
                       loss_weights=[1.0] + ([nll] if nll else []), label_smoothing=smoothing, max_length=None)
    trainer = DPOTrainer(model=model, ref_model=ref, args=config, processing_class=processor,
                         train_dataset=Dataset.from_list([{"prompt": "x", "chosen": "a", "rejected": "b"}] * 2))
    trl_loss = trainer._compute_loss(trainer.model, trl_inputs(processor, samples, completions), False)
    mode = "train" if trainer.model.training else "eval"
    trl_metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}

    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        ref_logps, _, mask = score_completions(ref, samples, completions, 2, pad, temperature=1.0, mode="grouped")
    seq = (ref_logps * mask).sum(-1)
    logps, _, mask = score_completions(trainer.model, samples, completions, 2, pad, temperature=1.0, mode="grouped")
    rows = PreferenceBatch(samples, completions[0::2], completions[1::2]).rows  # the fixture interleaves them
    ours = preference_loss(logps, mask, rows, seq[rows.chosen], seq[rows.rejected],
                           PreferenceLossSettings(loss_type=loss_type, beta=beta, label_smoothing=smoothing,
                                                  nll_weight=nll))
    assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert ours.chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-5)
    assert ours.rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-5)
    margins = (ours.chosen_rewards - ours.rejected_rewards).mean().item()
    assert margins == pytest.approx(trl_metrics["rewards/margins"], abs=1e-5)


def preference_file(tmp_path: Path, synthetic_data, kinds=("counting", "events")) -> Path:
    rows = []
    for task in kinds:
        path = synthetic_data[task]
        for i, line in enumerate(path.read_text().splitlines()[:3]):
            row = json.loads(line)
            key = "image" if "image" in row else "video"
            row[key] = str(path.parent / row[key])
            row.update(chosen=f"<answer>{row.get('solution', 'x')}</answer>", rejected=f"<answer>no {i}</answer>")
            rows.append(row)
    out = tmp_path / "pairs.jsonl"
    out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out


def recipe(tmp_path, data, *overrides):
    return load_recipe(None, ["model.name_or_path=tiny:qwen2_5_vl:small", f"data.train_path={data}",
                              f"training.output_dir={tmp_path / 'run'}", "media.max_pixels=3136", "media.max_frames=4",
                              "training.prompts_per_step=2", "training.max_steps=4", "training.learning_rate=1e-3",
                              "logging.progress_bar=false", *overrides])


@pytest.fixture(autouse=True)
def _cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))


def test_dpo_trains_on_image_and_video_pairs(tmp_path, synthetic_data):
    cfg = recipe(tmp_path, preference_file(tmp_path, synthetic_data), "algorithm.name=dpo", "data.shuffle=false")
    PreferenceTrainer(cfg).train()
    metrics = read_metrics(cfg.training.output_dir)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert metrics[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert metrics[-1]["rewards/margins"] > 0  # it learned to prefer the chosen answers
    assert (Path(cfg.training.output_dir) / "checkpoints" / "step-000004" / "model" / "config.json").exists()


def test_tpo_adds_the_nll_term_and_bad_rows_are_named(tmp_path, synthetic_data):
    data = preference_file(tmp_path, synthetic_data, kinds=("events",))
    cfg = recipe(tmp_path, data, "algorithm.name=tpo", "algorithm.dpo.nll_weight=1.0", "training.max_steps=1")
    PreferenceTrainer(cfg).train()
    assert read_metrics(cfg.training.output_dir)[0]["train/nll"] > 0
    broken = tmp_path / "broken.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0]["rejected"] = ""
    broken.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = recipe(tmp_path, broken, "algorithm.name=dpo", "data.shuffle=false", "training.max_steps=1")
    with pytest.raises(DataError, match=r"broken.jsonl: row 0 \(id events-0\): field 'rejected' must be a non-empty string"):
        PreferenceTrainer(cfg)  # found with the data, before the model loads


def test_tpo_build_on_event_videos_then_train(tmp_path, synthetic_data):
    from r1_mm.cli import main

    recipe_file = tmp_path / "tpo.yaml"
    recipe_file.write_text("model:\n  name_or_path: tiny:qwen2_5_vl:small\nmedia:\n  max_frames: 8\n"
                           "rollout:\n  max_completion_length: 6\n")
    out = tmp_path / "tpo_pairs.jsonl"
    assert main(["tpo", "build", str(recipe_file), "--out", str(out), f"data.train_path={synthetic_data['events']}",
                 f"training.output_dir={tmp_path / 'build'}"]) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert {p["tpo_kind"] for p in pairs} == {"localized", "comprehensive"}
    for p in pairs:
        assert p["chosen"] != p["rejected"] and Path(p["video"]).is_absolute() and Path(p["video"]).exists()
        assert p["id"] == f"{p['source_id']}-{p['tpo_kind']}"
    cfg = recipe(tmp_path, out, "algorithm.name=tpo", "algorithm.dpo.nll_weight=0.5", "training.max_steps=2")
    PreferenceTrainer(cfg).train()
    assert len(read_metrics(cfg.training.output_dir)) == 2


def test_best_and_worst_skips_ties_and_unscored():
    from r1_mm.trainers.iterative_dpo import best_and_worst

    assert best_and_worst(torch.tensor([0.2, 0.9, float("nan"), 0.1])) == (1, 3)
    assert best_and_worst(torch.tensor([0.5, 0.5, 0.5])) is None
    assert best_and_worst(torch.tensor([float("nan"), 0.3, float("nan")])) is None


def test_iterative_dpo_rounds_with_rewards(tmp_path, synthetic_data):
    from r1_mm.trainers.iterative_dpo import IterativeDPOTrainer

    plugin = Path(__file__).parent / "plugins" / "faulty.py"
    cfg = recipe(tmp_path, synthetic_data["counting"], "algorithm.name=iterative_dpo", "algorithm.iterative_dpo.round_prompts=4",
                 "rollout.num_generations=4", "rollout.max_completion_length=4", "data.format_instruction=null",
                 f"rewards.functions=[{{name: '{plugin}:alternating'}}]")
    IterativeDPOTrainer(cfg).train()
    metrics = read_metrics(cfg.training.output_dir)
    assert [m["iterative/round"] for m in metrics] == [1.0, 1.0, 2.0, 2.0]  # 4 pairs per round, 2 per step
    assert all(m["iterative/pairs"] == 4 and m["iterative/skipped_ties"] == 0 for m in metrics)
    assert metrics[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert metrics[2]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # the reference restarted from the policy
    cfg = recipe(tmp_path, synthetic_data["counting"], "algorithm.name=iterative_dpo", "algorithm.iterative_dpo.round_prompts=2",
                 "rollout.num_generations=2", "rollout.max_completion_length=2", f"training.output_dir={tmp_path / 'ties'}",
                 "rewards.functions=[{name: format, kwargs: {pattern: 'never'}}]")  # every response scores 0: ties
    with pytest.raises(RuntimeError, match="every response group tied on its rewards in 5 rounds"):
        IterativeDPOTrainer(cfg).train()


def test_precomputed_reference_matches_on_the_fly(tmp_path, synthetic_data):
    from r1_mm.cli import main

    data = preference_file(tmp_path, synthetic_data)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model:\n  name_or_path: tiny:qwen2_5_vl:small\nmedia:\n  max_pixels: 3136\n  max_frames: 4\n")
    out = tmp_path / "with_ref.jsonl"
    assert main(["dpo", "precompute-ref", str(recipe_file), "--out", str(out), f"data.train_path={data}"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(r["ref_chosen_logps"] < 0 and r["ref_rejected_logps"] < 0 for r in rows)
    live = recipe(tmp_path, data, "algorithm.name=dpo", "data.shuffle=false", "training.max_steps=2")
    PreferenceTrainer(live).train()
    stored = recipe(tmp_path, out, "algorithm.name=dpo", "data.shuffle=false", "training.max_steps=2",
                    "algorithm.dpo.precomputed_reference=true", f"training.output_dir={tmp_path / 'stored'}")
    trainer = PreferenceTrainer(stored)
    assert trainer.learner.reference is None  # no reference model in memory
    trainer.train()
    a, b = read_metrics(live.training.output_dir), read_metrics(stored.training.output_dir)
    for m_live, m_stored in zip(a, b, strict=True):
        assert m_stored["train/loss"] == pytest.approx(m_live["train/loss"], abs=1e-4)


def test_the_loss_reads_pairs_by_their_rows_not_their_positions():
    """The loss finds each pair's responses through PreferenceBatch's row indices: scoring the same
    responses in another row order, with rows that say so, gives the same loss and rewards."""
    gen = torch.Generator().manual_seed(3)
    batch = PreferenceBatch(samples=[None] * 3, chosen=[[1, 2], [3], [4, 5, 6]], rejected=[[7], [8, 9], [10]])
    assert batch.completions == [[1, 2], [7], [3], [8, 9], [4, 5, 6], [10]]
    logps = torch.randn(6, 3, generator=gen) - 2
    mask = (torch.arange(3)[None, :] < torch.tensor([len(c) for c in batch.completions])[:, None]).long()
    ref_c, ref_r = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
    settings = PreferenceLossSettings(loss_type="ipo", beta=0.2, nll_weight=0.3)
    out = preference_loss(logps, mask, batch.rows, ref_c, ref_r, settings)
    order = torch.tensor([5, 0, 3, 2, 4, 1])  # scored row k holds original row order[k]
    where = torch.argsort(order)
    moved = PairRows(chosen=where[batch.rows.chosen], rejected=where[batch.rows.rejected])
    out2 = preference_loss(logps[order], mask[order], moved, ref_c, ref_r, settings)
    torch.testing.assert_close(out2.loss, out.loss)
    torch.testing.assert_close(out2.chosen_rewards, out.chosen_rewards)
    # the stride reading of the permuted rows would be a different loss (the check above can fail)
    stride = PairRows(chosen=torch.arange(3) * 2, rejected=torch.arange(3) * 2 + 1)
    assert not torch.allclose(preference_loss(logps[order], mask[order], stride, ref_c, ref_r, settings).loss, out.loss)
    assert batch.select(1, 3).chosen == [[3], [4, 5, 6]] and batch.chosen_tokens == 6
    with pytest.raises(ValueError, match="one of each per prompt"):
        PreferenceBatch(samples=[None] * 2, chosen=[[1]], rejected=[[2], [3]])
