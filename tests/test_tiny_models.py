import hashlib

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from r1_mm.config.recipe import DataConfig, MediaConfig
from r1_mm.data import PromptBuilder
from r1_mm.data.loading import default_media_root, read_rows
from r1_mm.models.tiny import TAG_TOKENS, TinySpec, build_tiny_model, parse_tiny_name
from r1_mm.rollout import SamplingSettings, make_engine
from r1_mm.rollout.base import media_token_ids

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava_onevision", "qwen3_vl", "qwen3_vl_moe", "internvl", "glm4v", "qwen3_5",
            "qwen3_5_moe", "smolvlm", "glm4v_moe"]


def weights_digest(folder):
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_build_is_deterministic_from_seed(tmp_path):
    a = build_tiny_model(tmp_path / "a", TinySpec(seed=3))
    b = build_tiny_model(tmp_path / "b", TinySpec(seed=3))
    c = build_tiny_model(tmp_path / "c", TinySpec(seed=4))
    assert weights_digest(a) == weights_digest(b) != weights_digest(c)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_like_a_hub_model(tiny_path, family):
    path = tiny_path(family)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.model_type == family
    assert type(processor).__name__ == {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                                        "llava_onevision": "LlavaOnevisionProcessor", "qwen3_vl": "Qwen3VLProcessor", "qwen3_vl_moe": "Qwen3VLProcessor",
                                        "qwen3_5": "Qwen3VLProcessor", "qwen3_5_moe": "Qwen3VLProcessor",
                                        "internvl": "InternVLProcessor", "glm4v": "Glm4vProcessor",
                                        "smolvlm": "SmolVLMProcessor", "glm4v_moe": "Glm4vProcessor"}[family]
    assert processor.video_processor is not None and processor.image_processor is not None
    tok = processor.tokenizer
    image_token, video_token = {"llava_onevision": ("<image>", "<video>"), "internvl": ("<IMG_CONTEXT>", "<video>"),
                                "glm4v": ("<|image|>", "<|video|>"), "smolvlm": ("<image>", "<video>"),
                                "glm4v_moe": ("<|image|>", "<|video|>")}.get(
        family, ("<|image_pad|>", "<|video_pad|>"))
    for special in ["<|im_start|>", "<|im_end|>", image_token, video_token]:
        assert len(tok.tokenize(special)) == 1
    assert model.config.image_token_id == tok.convert_tokens_to_ids(image_token)
    if family not in ("internvl", "smolvlm"):  # frames are image tiles: the config names only the image token
        assert model.config.video_token_id == tok.convert_tokens_to_ids(video_token)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    assert head_dim >= 32  # vLLM's CPU attention needs it
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        tokenize=False, add_generation_prompt=True)
    media = {"llava_onevision": "<image>\n", "internvl": "<IMG_CONTEXT>\n",
             "glm4v": "<|begin_of_image|><|image|><|end_of_image|>", "smolvlm": "<image>",
             "glm4v_moe": "<|begin_of_image|><|image|><|end_of_image|>"}.get(
        family, "<|vision_start|><|image_pad|><|vision_end|>")
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        f"{media}Hi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("small", [False, True])
def test_digits_and_answer_tags_are_single_tokens(tiny_path, small):
    tok = AutoProcessor.from_pretrained(tiny_path("qwen2_5_vl", small=small)).tokenizer
    pieces = tok.tokenize("<think>ok</think><answer>1204</answer>")
    assert pieces[:1] == ["<think>"] and pieces[-6:] == ["<answer>", "1", "2", "0", "4", "</answer>"]
    assert all(len(tok.tokenize(t)) == 1 for t in TAG_TOKENS)
    assert tok.decode(tok.encode("<answer>7</answer>")) == "<answer>7</answer>"
    if small:
        big = AutoProcessor.from_pretrained(tiny_path("qwen2_5_vl", small=False)).tokenizer
        assert len(tok) < len(big)


def test_parse_tiny_names():
    assert parse_tiny_name("tiny:qwen2_vl:small") == TinySpec(family="qwen2_vl", small_vocab=True)
    with pytest.raises(ValueError, match="unknown tiny model family 'llama'"):
        parse_tiny_name("tiny:llama")
    with pytest.raises(ValueError, match="unknown tiny model option"):
        parse_tiny_name("tiny:qwen2_vl:huge")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", ["counting", "multi_image", "events"])
def test_round_trip_processor_generate(tiny_path, synthetic_data, family, task):
    """Every tiny model generates from an image, a multi-image and a video prompt built by our pipeline."""
    path = tiny_path(family)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    data = synthetic_data[task]
    builder = PromptBuilder(processor, DataConfig(), MediaConfig(), default_media_root(data))
    sample = builder.prepare(read_rows(data)[0], 0)
    engine = make_engine("hf", model=model, processor=processor)
    out = engine.generate([sample], 3, SamplingSettings(max_tokens=6, seed=0))
    comps = out[0].completions
    assert len(comps) == 3
    for c in comps:
        assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0 for lp in c.logprobs)
        assert c.truncated == (c.token_ids[-1] != processor.tokenizer.eos_token_id)
    # sampling logprobs agree with a teacher-forced forward of the same model (temperature 1), under the
    # same distribution: media placeholder tokens are suppressed when sampling
    banned = media_token_ids(model.config)
    assert banned and not any(t in banned for comp in comps for t in comp.token_ids)
    c = comps[0]
    full = torch.cat([sample.inputs["input_ids"], torch.tensor([c.token_ids])], dim=1)
    inputs = {k: v for k, v in sample.inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in sample.inputs:
        inputs["mm_token_type_ids"] = torch.cat(
            [sample.inputs["mm_token_type_ids"], torch.zeros(1, len(c.token_ids), dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=torch.ones_like(full), **inputs).logits
    p = sample.inputs["input_ids"].shape[1]
    logits[..., banned] = float("-inf")
    lp = torch.log_softmax(logits[0, p - 1:-1].float(), -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
    assert torch.allclose(lp, torch.tensor(c.logprobs), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_engine_prefills_once_per_prompt(tiny_path, synthetic_data, family):
    """G samples of a video prompt run the vision tower once and decode exactly as plain ``generate``."""
    path = tiny_path(family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    data = synthetic_data["events"]
    builder = PromptBuilder(processor, DataConfig(), MediaConfig(), default_media_root(data))
    sample = builder.prepare(read_rows(data)[0], 0)
    tower = getattr(model.model, "visual", None) or getattr(model.model, "vision_model", None) or model.model.vision_tower
    calls = []
    handle = tower.register_forward_hook(lambda mod, args, kwargs, out: calls.append(
        (args[0] if args else next(iter(kwargs.values()))).shape[0]), with_kwargs=True)
    engine = make_engine("hf", model=model, processor=processor)
    greedy = SamplingSettings(max_tokens=5, temperature=0.0)
    out = engine.generate([sample], 4, greedy)[0].completions
    with torch.no_grad():
        model(**sample.inputs)  # one plain forward of the prompt: what the tower sees for one copy
    handle.remove()
    assert len(calls) == 2 and calls[0] == calls[1]  # not G copies of the pixels
    with torch.no_grad():
        ref = model.generate(**sample.inputs, max_new_tokens=5, do_sample=False,
                             suppress_tokens=media_token_ids(model.config))
    expected = ref[0, sample.inputs["input_ids"].shape[1]:].tolist()
    for c in out:
        assert c.token_ids == expected[: len(c.token_ids)]


def test_hf_engine_logprobs_follow_the_sampling_distribution(tiny_path, synthetic_data):
    """With temperature, top-k and top-p, each sampled token's logprob is the one under the warped
    distribution generate sampled from (recorded a step at a time, never all steps' scores at once)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    path = tiny_path("qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    data = synthetic_data["counting"]
    sample = PromptBuilder(processor, DataConfig(), MediaConfig(), default_media_root(data)).prepare(read_rows(data)[0], 0)
    sampling = SamplingSettings(max_tokens=8, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    completions = make_engine("hf", model=model, processor=processor).generate([sample], 3, sampling)[0].completions
    banned = media_token_ids(model.config)
    for c in completions:
        full = torch.cat([sample.inputs["input_ids"], torch.tensor([c.token_ids])], dim=1)
        types = torch.cat([sample.inputs["mm_token_type_ids"], torch.zeros(1, len(c.token_ids), dtype=torch.long)], 1)
        with torch.no_grad():
            logits = model(input_ids=full, attention_mask=torch.ones_like(full), mm_token_type_ids=types,
                           pixel_values=sample.inputs["pixel_values"], image_grid_thw=sample.inputs["image_grid_thw"]).logits
        p = sample.inputs["input_ids"].shape[1]
        expected = []
        for k, token in enumerate(c.token_ids):
            scores = logits[:, p - 1 + k].float().clone()
            scores[:, banned] = float("-inf")
            for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9)):
                scores = warper(full[:, :p + k], scores)
            expected.append(float(torch.log_softmax(scores, -1)[0, token]))
        assert c.logprobs == pytest.approx(expected, abs=1e-4)
