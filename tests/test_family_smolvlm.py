"""SmolVLM2 (transformers' SmolVLMForConditionalGeneration): the tiny model builds deterministically, images are
split into tiles and videos into frames as the placeholders say, the grouped forward equals the naive one
(logprobs and gradients, 1e-5) for single-image, two-image and video rows through sdpa, eager and the flash
route, with and without gradient checkpointing, and the hf engine samples image and video rows with the
learner's logprobs."""

import hashlib

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from r1_mm.config.recipe import DataConfig, MediaConfig
from r1_mm.data import PromptBuilder
from r1_mm.data.loading import default_media_root, read_rows
from r1_mm.models.families import get_family
from r1_mm.models.families.smolvlm import image_seq_len
from r1_mm.models.forward import packed_attention
from r1_mm.models.tiny import TinySpec, build_tiny_model, parse_tiny_name
from r1_mm.rollout import SamplingSettings, make_engine
from r1_mm.rollout.base import media_token_ids

from . import flash_emulation
from .test_family_internvl import compare, hf_samples, max_gap
from .test_grouped_forward import load, prompts_for

FAMILY = "smolvlm"
TASKS = ["counting", "multi_image", "events"]  # one image, two images, a video


def digest(folder):
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_build_is_deterministic_and_loads(tmp_path):
    a = build_tiny_model(tmp_path / "a", TinySpec(family=FAMILY, seed=3))
    b = build_tiny_model(tmp_path / "b", TinySpec(family=FAMILY, seed=3))
    c = build_tiny_model(tmp_path / "c", TinySpec(family=FAMILY, seed=4))
    assert digest(a) == digest(b) != digest(c)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert parse_tiny_name("tiny:smolvlm:small") == TinySpec(family=FAMILY, small_vocab=True)
    model = AutoModelForImageTextToText.from_pretrained(a)
    processor = AutoProcessor.from_pretrained(a)
    assert type(model).__name__ == "SmolVLMForConditionalGeneration"
    assert type(processor).__name__ == "SmolVLMProcessor"
    assert type(processor.video_processor).__name__ == "SmolVLMVideoProcessor"
    assert processor.video_processor.do_sample_frames is False
    tok = processor.tokenizer
    for token in get_family(FAMILY).media_tokens:
        assert len(tok.tokenize(token)) == 1
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert (processor.fake_image_token, processor.global_image_token) == ("<fake_token_around_image>", "<global-img>")


@pytest.mark.parametrize("task", TASKS)
def test_prompt_expands_every_tile_and_frame(tiny_path, synthetic_data, task):
    """Images split into tiles (+ one global tile each), a video into one tile per frame with its time: the
    image tokens the processor writes are image_seq_len per tile it returns, and every tile carries pixels."""
    processor = AutoProcessor.from_pretrained(tiny_path(FAMILY))
    data = synthetic_data[task]
    sample = PromptBuilder(processor, DataConfig(), MediaConfig(), default_media_root(data)).prepare(read_rows(data)[0], 0)
    ids = sample.inputs["input_ids"][0]
    pixels, mask = sample.inputs["pixel_values"], sample.inputs["pixel_attention_mask"]
    tiles = pixels.shape[1]
    assert int((ids == processor.image_token_id).sum()) == tiles * image_seq_len()
    assert bool(mask.all())  # tiles of equal size: nothing padded within a prompt
    tok = processor.tokenizer
    globals_ = int((ids == tok.convert_tokens_to_ids("<global-img>")).sum())
    if sample.videos:
        assert globals_ == tiles == sample.videos[0].num_frames
        assert sample.prompt_text.count("<video>") == 1 and "Frame from" in tok.decode(ids)
    else:
        assert globals_ == len(sample.images) and tiles > len(sample.images)  # the premise: images were split


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_grouped_equals_naive(tiny_path, synthetic_data, monkeypatch, task, attn):
    model, processor = load(tiny_path, FAMILY, attn=attn)
    compare(monkeypatch, model, processor, prompts_for(processor, synthetic_data[task]))


@pytest.mark.parametrize("task", TASKS)
def test_grouped_equals_naive_with_gradient_checkpointing(tiny_path, synthetic_data, monkeypatch, task):
    model, processor = load(tiny_path, FAMILY, checkpointing=True)
    assert model.is_gradient_checkpointing
    compare(monkeypatch, model, processor, prompts_for(processor, synthetic_data[task]))


def test_grouped_packs_prompts_with_different_tile_counts(tiny_path, synthetic_data, monkeypatch):
    """A one-image prompt (5 tiles) and a two-image prompt (10 tiles) in one packed row: the shorter prompt's
    tiles are padded with all-zero tiles (as SmolVLM's processor pads a batch), which the model drops."""
    model, processor = load(tiny_path, FAMILY)
    one = prompts_for(processor, synthetic_data["counting"])[0]
    two = prompts_for(processor, synthetic_data["multi_image"])[0]
    assert one["pixel_values"].shape[1] != two["pixel_values"].shape[1]
    compare(monkeypatch, model, processor, [one, two])


def test_grouped_flash_attention_route(tiny_path, synthetic_data, monkeypatch):
    """transformers' flash integration with the packed varlen sequences (CUDA kernel replaced by the CPU
    stand-in of tests/flash_emulation.py); reference: plain sdpa on an identical model."""
    calls = flash_emulation.install(monkeypatch)
    model, processor = load(tiny_path, FAMILY)
    reference, _ = load(tiny_path, FAMILY)
    packed_attention.register()
    model.set_attn_implementation({"text_config": packed_attention.grouped_name("flash_attention_2")})
    compare(monkeypatch, model, processor, prompts_for(processor, synthetic_data["multi_image"]), reference=reference)
    assert calls["varlen"] == model.config.get_text_config().num_hidden_layers


def test_hf_engine_samples_images_and_video_with_the_learners_logprobs(tiny_path, synthetic_data):
    path = tiny_path(FAMILY)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    samples = hf_samples(processor, synthetic_data)
    engine = make_engine("hf", model=model, processor=processor)
    assert engine.name == "hf"
    outs = engine.generate(samples, 3, SamplingSettings(max_tokens=8, temperature=1.0, seed=5))
    assert [len(o.completions) for o in outs] == [3, 3, 3]
    assert not any(t in media_token_ids(model.config) for o in outs for c in o.completions for t in c.token_ids)
    with torch.no_grad():
        for mode in ("grouped", "naive"):
            assert max_gap(model, processor, samples, outs, mode) < 1e-5, mode
