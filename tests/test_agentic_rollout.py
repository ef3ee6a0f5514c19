"""Multi-turn tool rollouts on the hf engine: calls parsed from the model's turn run, their crops come back as
images, and the model goes on; the learner scores every model token of the trajectory as the engine sampled it
(grouped and naive forward, 1e-5), and tool tokens are neither scored nor trained on.

The tiny random model never writes a tool call by itself, so a scripted policy picks its tokens: a logits
processor placed after the engine's logprob recorder (``HFRolloutEngine.after_recorder``). The recorder still
reports each token's logprob under the model, so the sampler-vs-learner contract is checked on real numbers;
only the choice of tokens is scripted (a model that has learned to call tools cannot exist here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessor

from r1_mm.config.recipe import DataConfig, MediaConfig, ToolsConfig, ToolSpec
from r1_mm.data import PromptBuilder
from r1_mm.data.loading import default_media_root, read_rows
from r1_mm.models.forward.scoring import score_completions
from r1_mm.rollout import SamplingSettings
from r1_mm.rollout.agentic import ToolRollout, tool_schemas
from r1_mm.rollout.base import media_token_ids
from r1_mm.rollout.hf import HFRolloutEngine

CALL = '<tool_call>\n{{"name": "crop_image", "arguments": {{"bbox_2d": {box}}}}}\n</tool_call>'
SCRIPT = [CALL.format(box="[0, 0, 56, 56]"), CALL.format(box="[20, 20, 100, 90]"), "<answer>3</answer>"]


class ScriptedTurns(LogitsProcessor):
    """Forces turn t of every row to ``turns[t]`` then the end token; the turn is read from the ids (the number
    of <|im_start|> headers after the prompt's), the step from where this generate call started."""

    def __init__(self, tokenizer, turns: list[str], prompt_headers: int):
        self.turns = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in turns]
        self.start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.headers = prompt_headers
        self.start_len: int | None = None
        self.last_len = -1

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length != self.last_len + 1:  # a new generate call: a new turn
            self.start_len = length
        self.last_len = length
        forced = scores.new_full(scores.shape, float("-inf"))
        for row in range(input_ids.shape[0]):
            turn = (int((input_ids[row] == self.start_id).sum()) - self.headers) // 2
            script = self.turns[min(turn, len(self.turns) - 1)]
            step = length - self.start_len
            forced[row, script[step] if step < len(script) else self.end_id] = 0.0
        return forced


_SETTINGS: dict[str, tuple] = {}


@pytest.fixture
def setting(request, tiny_path, synthetic_data):
    family = getattr(request, "param", "qwen2_5_vl")
    if family not in _SETTINGS:
        _SETTINGS[family] = _setting(tiny_path(family), synthetic_data)
    return _SETTINGS[family]


def _setting(path, synthetic_data):
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa")
    tools = ToolsConfig(functions=[ToolSpec("crop_image")], max_turns=3, max_tool_calls=2)
    data = synthetic_data["counting"]
    builder = PromptBuilder(processor, DataConfig(), MediaConfig(), default_media_root(data), tools=tool_schemas(tools))
    samples = [builder.prepare(row, i) for i, row in enumerate(read_rows(data)[:2])]
    return processor, model, tools, samples


def scripted_engine(processor, model, samples, script):
    engine = HFRolloutEngine(model, processor)
    headers = int((samples[0].inputs["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<|im_start|>")).sum())
    engine.after_recorder = [ScriptedTurns(processor.tokenizer, script, headers)]
    return engine


@pytest.mark.parametrize("setting,temperature", [("qwen2_5_vl", 1.0), ("qwen2_5_vl", 0.7), ("qwen3_vl", 1.0)],
                         indirect=["setting"])
def test_tool_trajectories_are_sampled_and_scored_alike(setting, temperature):
    processor, model, tools, samples = setting
    rollout = ToolRollout(scripted_engine(processor, model, samples, SCRIPT), processor, tools, MediaConfig())
    g = 2
    try:
        results = rollout.generate(samples, g, SamplingSettings(max_tokens=96, temperature=temperature, seed=0))
    finally:
        rollout.close()
    completions = [c for r in results for c in r.completions]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for c in completions:
        assert c.trajectory.stop_reason == "answer" and not c.truncated
        assert c.trajectory.final_text == "<answer>3</answer>" and c.trajectory.model_turns == 3
        assert [call["status"] for call in c.trajectory.calls] == ["ok", "ok"]
        assert [call["arguments"]["bbox_2d"] for call in c.trajectory.calls] == [[0, 0, 56, 56], [20, 20, 100, 90]]
        assert c.context.num_images == 2 and image_pad in c.token_ids
        assert c.text.endswith("<answer>3</answer>") and "<tool_response>" in c.text
        mask = torch.tensor(c.context.model_mask, dtype=torch.bool)
        assert 0 < int(mask.sum()) < len(c.token_ids)
    assert rollout.stats["tools/call_rate"] == 1.0 and rollout.stats["tools/success_rate"] == 1.0
    assert rollout.stats["tools/turns"] == 3.0

    ids = [c.token_ids for c in completions]
    contexts = [c.context for c in completions]
    with torch.no_grad():
        for mode in ("grouped", "naive"):
            logps, _, scored = score_completions(model, samples, ids, g, processor.tokenizer.pad_token_id,
                                                 temperature=temperature, mode=mode, contexts=contexts,
                                                 suppressed_ids=media_token_ids(model.config))
            for row, c in enumerate(completions):
                mask = torch.tensor(c.context.model_mask, dtype=torch.bool)
                engine = torch.tensor(c.logprobs)[mask]
                learner = logps[row, : len(c.token_ids)][mask]
                assert torch.isfinite(engine).all()
                gap = float((engine - learner).abs().max())
                assert gap < 1e-5, (mode, row, gap)
                assert scored[row, : len(c.token_ids)].tolist() == c.context.model_mask


def test_bad_calls_return_errors_to_the_model_and_limits_hold(setting):
    processor, model, tools, samples = setting
    script = ['<tool_call>{"name": "zoom", "arguments": {}}</tool_call>',  # unknown tool
              '<tool_call>{"name": "crop_image", "arguments": {"bbox_2d": [9, 9, 1]}}</tool_call>',  # bad argument
              CALL.format(box="[0, 0, 56, 56]")]  # a third call: over max_tool_calls=2
    rollout = ToolRollout(scripted_engine(processor, model, samples[:1], script), processor, tools, MediaConfig())
    try:
        (result,) = rollout.generate(samples[:1], 1, SamplingSettings(max_tokens=96, seed=0))
    finally:
        rollout.close()
    (c,) = result.completions
    statuses = [call["status"] for call in c.trajectory.calls]
    assert statuses == ["unknown_tool", "bad_arguments"]
    assert "Error: unknown tool 'zoom'; the tools are: crop_image" in c.text
    assert "bbox_2d must have 4 items, got 3" in c.text
    assert c.trajectory.stop_reason == "max_turns" and c.context.num_images == 0
    assert rollout.stats["tools/call_rate"] == 0.0 and rollout.stats["tools/success_rate"] == 0.0
    assert rollout.stats["tools/errors/unknown_tool"] == 1.0


@pytest.fixture
def scripted_engine_name():
    """A registered engine "scripted_hf": the hf engine with SCRIPT's turns (prompts with a tools system turn,
    a user turn and the generation header hold 3 <|im_start|>)."""
    from r1_mm.rollout.engines import ENGINES

    def scripted(model, processor, **_):
        engine = HFRolloutEngine(model, processor)
        engine.after_recorder = [ScriptedTurns(processor.tokenizer, SCRIPT, prompt_headers=3)]
        return engine

    ENGINES.register("scripted_hf", scripted, replace=True)
    yield "scripted_hf"
    ENGINES.remove("scripted_hf")


def tool_recipe(tmp_path, synthetic_data, *overrides):
    from r1_mm.config.recipe import load_recipe

    return load_recipe(None, [
        "model.name_or_path=tiny:qwen2_5_vl", f"data.train_path={synthetic_data['counting']}",
        f"training.output_dir={tmp_path / 'run'}", "data.format_instruction=null", "media.max_pixels=12544",
        "media.min_pixels=3136", "rollout.engine=scripted_hf", "rollout.num_generations=2",
        "rollout.max_completion_length=96", "training.prompts_per_step=2", "training.max_steps=2",
        "training.learning_rate=1e-3", "logging.progress_bar=false", "data.shuffle=false",
        "tools.functions=[crop_image]", "tools.max_turns=3", "tools.max_tool_calls=2", *overrides])


def test_grpo_trains_on_tool_trajectories(tmp_path, synthetic_data, tiny_cache, monkeypatch, scripted_engine_name):
    """A whole GRPO run with tools: calls run every step, the learner's importance ratio against the engine is 1
    on the model's tokens (tool tokens out of the loss), and the step logs the tool metrics."""
    from r1_mm.run.tracking import read_metrics
    from r1_mm.trainers.grpo import GRPOTrainer

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tool_recipe(tmp_path, synthetic_data, "algorithm.grpo.rollout_is=token_truncate",
                      "rewards.functions=[accuracy, tool_use]", "logging.report_to=[wandb]", "logging.table_steps=1",
                      "logging.run_name=tools")
    trainer = GRPOTrainer(cfg)
    assert isinstance(trainer.engine, ToolRollout)
    trainer.train()
    metrics = read_metrics(cfg.training.output_dir)
    assert len(metrics) == 2, metrics
    for m in metrics:
        assert m["tools/call_rate"] == 1.0 and m["tools/success_rate"] == 1.0 and m["tools/turns"] == 3.0
        assert m["tools/tool_tokens"] > 0
        assert abs(m["rollout/is_ratio_mean"] - 1.0) < 1e-4 and m["rollout/logprob_abs_diff_max"] < 1e-4
        # every trajectory called and answered 3: the bonus is paid exactly where the answer is right
        assert m["rewards/tool_use/mean"] == m["rewards/accuracy/mean"] == m["tools/accuracy_with_call"]
        assert m["tools/accuracy_without_call"] == "nan"  # no trajectory went without a call (NaN is logged as "nan")
    assert {m["rewards/accuracy/mean"] for m in metrics} != {0.0}  # some row's answer is 3: the bonus was paid
    first = json.loads(Path(cfg.training.output_dir, "completions.jsonl").read_text().splitlines()[0])
    assert "<tool_response>" in first["completion"] and first["completion"].endswith("<answer>3</answer>")
    assert [c["status"] for c in first["trajectory"]["calls"]] == ["ok", "ok"]
    assert len(first["tool_images"]) == 2
    assert all((Path(cfg.training.output_dir) / p).is_file() for p in first["tool_images"])
    # W&B (offline, really started): the completions table carries each trajectory's tool images and calls
    (run,) = sorted((Path(cfg.training.output_dir) / "wandb").glob("offline-run-*"))
    table = json.loads(sorted((run / "files" / "media" / "table").glob("completions_*.table.json"))[0].read_text())
    assert table["columns"][-2:] == ["tool_images", "calls"]
    assert all(row[-2] == "Image" and json.loads(row[-1])[0]["name"] == "crop_image" for row in table["data"])


def test_asynchronous_tool_trajectories_train_with_exact_is_weights(tmp_path, synthetic_data, tiny_cache, monkeypatch,
                                                                   scripted_engine_name):
    """rollout.max_staleness=1 with tools: a trajectory's turns are all sampled by one version (the engine gets new
    weights only between the producer's generate calls), step t trains on version t - 1's trajectories, every model
    token's sampler logprob equals that version's weights' (tool tokens out of the mask), and the IS weights are
    exp(learner at version t - sampler) capped."""
    from r1_mm.run.tracking import read_metrics
    from r1_mm.trainers.grpo import GRPOTrainer

    from .test_async_rollouts import check_against_versions, spy_corrections

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    seen = spy_corrections(monkeypatch)
    cfg = tool_recipe(tmp_path, synthetic_data, "rollout.max_staleness=1", "algorithm.grpo.rollout_is=token_truncate",
                      "algorithm.grpo.rollout_is_cap=1.5", "training.max_steps=3", "training.learning_rate=1e-2",
                      # rewards that differ within a group (the scripted answers all agree): the weights move
                      f"rewards.functions=[{{name: '{Path(__file__).parent / 'plugins' / 'faulty.py'}:alternating'}}]")
    trainer = GRPOTrainer(cfg)
    trainer.train()
    metrics = read_metrics(cfg.training.output_dir)
    assert [m["async/staleness"] for m in metrics] == [0.0, 1.0, 1.0]
    assert all(m["tools/call_rate"] == 1.0 for m in metrics)  # the premise: every trajectory called, on every step
    assert all(exp.batch.has_tool_turns for _, exp, *_ in seen)
    assert check_against_versions(trainer, seen, cap=1.5, sampler_atol=1e-5) == 2  # steps 1 and 2 trained stale samples


def test_rollout_job_writes_whole_trajectories(tmp_path, synthetic_data, tiny_cache, monkeypatch, scripted_engine_name):
    """`r1-mm rollout` with tools: each completions.jsonl row holds its trajectory (calls, results, turns) and the
    tool images the model saw, as PNG files in the run folder; the step's tool metrics are logged."""
    from PIL import Image

    from r1_mm.jobs.rollout import run_rollouts
    from r1_mm.run.tracking import read_metrics

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    run_dir = run_rollouts(tool_recipe(tmp_path, synthetic_data, "training.max_steps=1"))
    rows = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert row["trajectory"]["model_turns"] == 3 and row["trajectory"]["stop_reason"] == "answer"
        assert [c["arguments"]["bbox_2d"] for c in row["trajectory"]["calls"]] == [[0, 0, 56, 56], [20, 20, 100, 90]]
        assert row["trajectory"]["calls"][0]["text"].startswith("Zoomed into [0, 0, 56, 56] of image 0")
        images = [Image.open(run_dir / p) for p in row["tool_images"]]
        assert len(images) == 2 and all(im.width % 28 == 0 and im.height % 28 == 0 for im in images)
    assert read_metrics(run_dir)[0]["tools/call_rate"] == 1.0


def test_eval_prompts_of_a_tool_recipe_show_the_tools(tmp_path, synthetic_data, tiny_path):
    """In-run and offline evaluation render the eval prompts with the tools' schemas, as training does."""
    from r1_mm.trainers.evaluation import eval_rows

    cfg = tool_recipe(tmp_path, synthetic_data, f"data.eval_path={synthetic_data['counting']}")
    processor = AutoProcessor.from_pretrained(tiny_path("qwen2_5_vl"))
    samples = eval_rows(cfg, processor)
    assert samples and all('<tools>\n{"type": "function", "function": {"name": "crop_image"' in s.prompt_text
                           for s in samples)


def test_the_total_pixel_budget_is_what_the_model_gets(setting):
    """tools.max_total_pixels: the second crop would pass it, so it is not shown; its call's text says so, and the
    drop is counted."""
    processor, model, _, samples = setting
    limited = ToolsConfig(functions=[ToolSpec("crop_image")], max_turns=3, max_tool_calls=2,
                          max_total_pixels=56 * 56 + 100)  # the first crop (56 x 56 shown) fits, the second not
    rollout = ToolRollout(scripted_engine(processor, model, samples[:1], SCRIPT), processor, limited, MediaConfig())
    try:
        (result,) = rollout.generate(samples[:1], 1, SamplingSettings(max_tokens=96, seed=0))
    finally:
        rollout.close()
    (c,) = result.completions
    first, second = c.trajectory.calls
    assert (first["images"], first["dropped_images"]) == (1, 0)
    assert (second["images"], second["dropped_images"]) == (0, 1)
    assert "1 image(s) not shown" in second["text"] and "tools.max_total_pixels" in second["text"]
    assert c.context.num_images == 1 and rollout.stats["tools/dropped_images"] == 1.0
