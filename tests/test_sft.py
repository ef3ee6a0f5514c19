"""SFT (``algorithm: sft``): the loss is the NLL of the assistant's tokens only, computed on the rows packed into one
padding-free sequence; tool-calling rows train on exactly the trajectory a GRPO rollout would hold (the recipe's
tool really runs, its turn is context); bad rows are refused at load, naming the row."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from r1_mm.data.loading import DataError, read_rows
from r1_mm.testing.synthetic import make_zoom_sft_task, make_zoom_task, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _recipe(model, data, out, **sections) -> dict:
    cfg = {"model": {"name_or_path": str(model)},
           "data": {"train_path": str(data), "format_instruction": None},
           "media": {"min_pixels": 3136, "max_pixels": 3136},
           "algorithm": {"name": "sft"},
           "training": {"max_steps": 1, "prompts_per_step": 4, "learning_rate": 1e-3, "output_dir": str(out),
                        "save_steps": 100},
           "logging": {"progress_bar": False}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@pytest.fixture(scope="module")
def counting_sft(synthetic_data, tmp_path_factory):
    rows = read_rows(synthetic_data["counting"])
    for row in rows:
        row["image"] = str(synthetic_data["counting"].parent / row["image"])
        row["response"] = f"<think>I count the squares.</think><answer>{row['solution']}</answer>"
    return write_jsonl(rows, tmp_path_factory.mktemp("sft") / "sft.jsonl")


def test_the_loss_is_the_nll_of_the_assistant_tokens_of_rows_packed_into_one_sequence(tiny_path, counting_sft,
                                                                                          tmp_path):
    """The first step's loss equals the token-mean NLL of the responses (and their end-of-turn tokens) under the
    naive forward of each whole conversation as the chat template renders it: nothing of the prompt counts. The
    premise: the four rows went through the packed attention as one sequence (one kernel call per text layer)."""
    from r1_mm.models.forward.packed_attention import KERNEL_CALLS
    from r1_mm.trainers.sft import SFTTrainer

    model_path = tiny_path("qwen2_5_vl")
    trainer = SFTTrainer(_recipe(model_path, counting_sft, tmp_path / "run"))
    seen = []
    next_batch = trainer.stream.next_batch
    trainer.stream.next_batch = lambda n: seen.extend(next_batch(n)) or seen[-n:]
    before = KERNEL_CALLS["sdpa"]
    metrics = trainer.train_step()
    trainer.run.close()
    layers = trainer.learner.unwrapped.config.get_text_config().num_hidden_layers
    assert KERNEL_CALLS["sdpa"] - before == layers  # one packed forward of all 4 rows, not one per row
    assert metrics["train/micro_batches"] == 1 and len(seen) == 4

    processor = AutoProcessor.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    total, count = 0.0, 0
    for sample in seen:
        prompt = processor.apply_chat_template(sample.messages, tokenize=False, add_generation_prompt=True)
        whole = processor.apply_chat_template(
            sample.messages + [{"role": "assistant", "content": [{"type": "text", "text": sample.row["response"]}]}],
            tokenize=False)
        assert whole.startswith(prompt)
        inputs = processor(text=[whole.rstrip("\n")], images=sample.images, return_tensors="pt")
        n_prompt = int(processor(text=[prompt], images=sample.images, return_tensors="pt")["input_ids"].shape[1])
        with torch.no_grad():
            logits = model(**inputs).logits[0].float()
        ids = inputs["input_ids"][0]
        logps = torch.log_softmax(logits[n_prompt - 1:-1], -1).gather(-1, ids[n_prompt:, None]).squeeze(-1)
        assert processor.tokenizer.decode(ids[-1:]) == "<|im_end|>"  # the end-of-turn token is trained too
        total -= float(logps.sum())
        count += int(logps.numel())
    assert metrics["train/tokens"] == count
    assert metrics["train/loss"] == pytest.approx(total / count, abs=1e-5)


def test_sft_lowers_the_loss_on_its_responses(tiny_path, counting_sft, tmp_path):
    from r1_mm.trainers.sft import SFTTrainer

    out = tmp_path / "run"
    SFTTrainer(_recipe(tiny_path("qwen2_5_vl", small=True), counting_sft, out,
                       training={"max_steps": 12, "prompts_per_step": 4, "learning_rate": 3e-3})).train()
    losses = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3
    # a GRPO recipe's model.name_or_path may be this run's folder: its last checkpoint's model
    from r1_mm.config.recipe import ModelConfig
    from r1_mm.models.loading import resolve_model_path

    assert resolve_model_path(ModelConfig(name_or_path=str(out))) == str(out / "checkpoints" / "step-000012" / "model")


@pytest.fixture(scope="module")
def zoom_rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoom")
    zoom = make_zoom_task(root, 4, seed=0, size=224, region=56, max_count=4, box=20, gap=8)
    return make_zoom_sft_task(zoom, 4, shown=56, seed=1, call_fraction=1.0)


TOOLS = {"functions": ["crop_image"], "max_turns": 2, "max_tool_calls": 1, "max_pixels_per_image": 3136,
         "schemas_in_prompt": False}


def test_tool_rows_train_on_the_rollout_trajectory_with_the_tool_turn_as_context(tiny_path, zoom_rows, tmp_path):
    """A row's turns replay through ToolRollout: the crop really ran on the row's image (its 56 x 56 region, 4
    vision tokens), the call and the answer are trained (each with its end token), the tool turn is not."""
    from r1_mm.trainers.sft import SFTTrainer

    model_path = tiny_path("qwen2_5_vl", small=True, tools=True)
    trainer = SFTTrainer(_recipe(model_path, zoom_rows, tmp_path / "run", tools=TOOLS))
    samples = trainer.stream.next_batch(4)
    completions, stats = trainer.targets(samples)
    tokenizer = trainer.processor.tokenizer
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert stats["tools/call_rate"] == 1.0 and stats["tools/success_rate"] == 1.0
    for sample, c in zip(samples, completions, strict=True):
        call, answer = sample.row["turns"]
        call_ids = tokenizer(call, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        mask = c.context.model_mask
        assert c.token_ids[:len(call_ids)] == call_ids and c.token_ids[-len(answer_ids):] == answer_ids
        assert mask == [1] * len(call_ids) + [0] * (len(mask) - len(call_ids) - len(answer_ids)) + [1] * len(answer_ids)
        tool_turn = c.token_ids[len(call_ids):-len(answer_ids)]
        assert tool_turn.count(image_pad) == 4  # the crop: 56 x 56 px -> 4 merged vision tokens
        (record,) = c.trajectory.calls
        assert record["status"] == "ok" and record["arguments"]["bbox_2d"] == [
            round(v * 56 / 224) for v in sample.row["region"]]
    metrics = trainer.sft_update(samples, completions)
    trainer.run.close()
    assert metrics["train/tokens"] == sum(sum(c.context.model_mask) for c in completions)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_a_turn_whose_call_does_not_run_is_refused_naming_the_row(tiny_path, zoom_rows, tmp_path):
    from r1_mm.trainers.sft import SFTDataError, SFTTrainer

    rows = read_rows(zoom_rows)
    rows[0]["turns"][0] = '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [9, 9, 1, 1]}}\n</tool_call>'
    for row in rows:
        row["image"] = str(zoom_rows.parent / row["image"])
    bad = write_jsonl(rows, tmp_path / "bad.jsonl")
    trainer = SFTTrainer(_recipe(tiny_path("qwen2_5_vl", small=True, tools=True), bad, tmp_path / "run", tools=TOOLS))
    try:
        with pytest.raises(SFTDataError, match=rf"row {rows[0]['id']}: tool call 'crop_image' did not run \(bad_arguments"):
            trainer.targets(trainer.stream.next_batch(4))
    finally:
        trainer.run.close()


@pytest.mark.parametrize("change, message", [
    ({"response": None}, r"row 1 \(id counting-1\): needs 'response' \(a non-empty string; algorithm.sft.response_field\)"),
    ({"turns": ["<answer>1</answer>", "<answer>2</answer>"]}, r"row 1 \(id counting-1\) has 2 turns \(tool calls\) but "
                                                              "the recipe has no tools.functions"),
    ({"turns": []}, r"row 1 \(id counting-1\): field 'turns' must be a non-empty list"),
])
def test_bad_sft_rows_are_refused_at_load(tiny_path, counting_sft, tmp_path, change, message):
    from r1_mm.trainers.sft import SFTTrainer

    rows = read_rows(counting_sft)
    rows[1].update(change)
    if change.get("response", "") is None:
        del rows[1]["response"]
    bad = write_jsonl(rows, tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=message):
        SFTTrainer(_recipe(tiny_path("qwen2_5_vl"), bad, tmp_path / "run"))
