"""InternVL 3/3.5 (transformers' InternVLForConditionalGeneration): the tiny model builds deterministically,
the grouped forward equals the naive one (logprobs and gradients, 1e-5) for single-image, two-image and
video rows through sdpa, eager and the flash route, with and without gradient checkpointing, and the hf
engine samples image and video rows with the learner's logprobs."""

import hashlib

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor

from r1_mm.config.recipe import DataConfig, MediaConfig
from r1_mm.data import PromptBuilder
from r1_mm.data.loading import default_media_root, read_rows
from r1_mm.models.families import get_family
from r1_mm.models.forward import packed_attention
from r1_mm.models.tiny import TinySpec, build_tiny_model, parse_tiny_name

from . import flash_emulation
from .test_grouped_forward import compare, load, prompts_for

FAMILY = "internvl"
TASKS = ["counting", "multi_image", "events"]  # one image, two images, a video


def digest(folder):
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_build_is_deterministic_and_loads(tmp_path):
    a = build_tiny_model(tmp_path / "a", TinySpec(family=FAMILY, seed=3))
    b = build_tiny_model(tmp_path / "b", TinySpec(family=FAMILY, seed=3))
    c = build_tiny_model(tmp_path / "c", TinySpec(family=FAMILY, seed=4))
    assert digest(a) == digest(b) != digest(c)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert parse_tiny_name("tiny:internvl:small") == TinySpec(family=FAMILY, small_vocab=True)
    model = AutoModelForImageTextToText.from_pretrained(a)
    processor = AutoProcessor.from_pretrained(a)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert type(processor).__name__ == "InternVLProcessor"
    assert type(processor.video_processor).__name__ == "InternVLVideoProcessor"
    tok = processor.tokenizer
    for token in get_family(FAMILY).media_tokens:
        assert len(tok.tokenize(token)) == 1
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert (processor.start_image_token, processor.end_image_token, processor.video_token) == ("<img>", "</img>", "<video>")


@pytest.mark.parametrize("task", TASKS)
def test_prompt_expands_every_tile_and_frame(tiny_path, synthetic_data, task):
    """The placeholders the processor writes match the tiles/frames it returns: 4 context tokens per tile."""
    processor = AutoProcessor.from_pretrained(tiny_path(FAMILY))
    data = synthetic_data[task]
    sample = PromptBuilder(processor, DataConfig(), MediaConfig(), default_media_root(data)).prepare(read_rows(data)[0], 0)
    ids = sample.inputs["input_ids"][0]
    tiles = sample.inputs["pixel_values"].shape[0]
    assert int((ids == processor.image_token_id).sum()) == tiles * processor.image_seq_length
    assert int((ids == processor.start_image_token_id).sum()) == (sum(v.num_frames for v in sample.videos)
                                                                   + len(sample.images))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_grouped_equals_naive(tiny_path, synthetic_data, task, attn):
    model, processor = load(tiny_path, FAMILY, attn=attn)
    compare(model, processor, prompts_for(processor, synthetic_data[task]))


@pytest.mark.parametrize("task", TASKS)
def test_grouped_equals_naive_with_gradient_checkpointing(tiny_path, synthetic_data, task):
    model, processor = load(tiny_path, FAMILY, checkpointing=True)
    assert model.is_gradient_checkpointing
    compare(model, processor, prompts_for(processor, synthetic_data[task]))


def test_grouped_flash_attention_route(tiny_path, synthetic_data, monkeypatch):
    """transformers' flash integration with the packed varlen sequences (CUDA kernel replaced by the CPU
    stand-in of tests/flash_emulation.py); reference: plain sdpa on an identical model."""
    calls = flash_emulation.install(monkeypatch)
    model, processor = load(tiny_path, FAMILY)
    reference, _ = load(tiny_path, FAMILY)
    packed_attention.register()
    model.set_attn_implementation({"text_config": packed_attention.grouped_name("flash_attention_2")})
    compare(model, processor, prompts_for(processor, synthetic_data["events"]), reference=reference)
    assert calls["varlen"] == model.config.get_text_config().num_hidden_layers
