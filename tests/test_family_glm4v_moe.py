"""GLM-4.5V (transformers' Glm4vMoeForConditionalGeneration): GLM-4.1V's vision side over a MoE decoder.

The grouped forward equals the naive one (logprobs and gradients, 1e-5) for single-image, two-image and video
rows through sdpa, eager and the flash route, with gradient checkpointing; the experts reach vLLM in the
checkpoint's per-expert layout; the hf engine samples with the learner's logprobs; vllm_pool (LoRA merged)
follows 3 perturb + sync rounds within 1e-4 with the learner's prompt ids; vllm_colocate gives importance ratio
1 at temperature 0.7 / top_p 0.7 / top_k 5 and the learner's prompt ids. Two vLLM engine starts in all."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from r1_mm.config.recipe import load_recipe
from r1_mm.models.families import get_family
from r1_mm.models.forward import packed_attention
from r1_mm.rollout import SamplingSettings, make_engine
from r1_mm.rollout.base import media_token_ids

from . import flash_emulation
from .test_family_internvl import compare, hf_samples, max_gap
from .test_grouped_forward import load, prompts_for
from .test_sampling_convention import ENGINE_STEPS
from .test_vllm_engines import learner_logprobs, perturb, recipe, samples_for

FAMILY = "glm4v_moe"
TASKS = ["counting", "multi_image", "events"]  # one image, two images, a video


@pytest.fixture(autouse=True)
def _cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))


def test_tiny_model_is_sparse_with_non_square_experts_sent_in_checkpoint_layout(tiny_path):
    """Layer 0 dense, layer 1 routed experts + a shared expert; the checkpoint holds one gate/up/down projection
    per expert (transformers fuses them in memory) and the sync sends exactly the file's names and tensors, so a
    transposed expert (width 96 != hidden 64) could not load in vLLM."""
    from safetensors import safe_open

    from r1_mm.models.weights import iter_policy_weights, policy_weight_specs

    path = tiny_path(FAMILY, small=True)
    model = AutoModelForImageTextToText.from_pretrained(path)
    text = model.config.text_config
    layers = model.model.language_model.layers
    assert type(layers[0].mlp).__name__ == "Glm4vMoeTextMLP" and type(layers[1].mlp).__name__ == "Glm4vMoeTextMoE"
    assert text.moe_intermediate_size != text.hidden_size and text.routed_scaling_factor != 1.0
    fused = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    assert list(dict(model.named_parameters())[fused].shape) == [4, 2 * text.moe_intermediate_size, text.hidden_size]
    expert = "model.language_model.layers.1.mlp.experts.3.down_proj.weight"
    sent = dict(iter_policy_weights(model))
    with safe_open(str(path / "model.safetensors"), "pt") as saved:
        assert saved.get_slice(expert).get_shape() == [text.hidden_size, text.moe_intermediate_size]
        # the file also holds the router's score-correction buffer, which no training step changes
        assert set(saved.keys()) - set(sent) == {"model.language_model.layers.1.mlp.gate.e_score_correction_bias"}
        assert all(torch.equal(t, saved.get_tensor(k)) for k, t in sent.items())
    assert [n for n, _, _ in policy_weight_specs(model)] == list(sent)


def test_config_vllm_would_read_differently_is_refused_in_one_line(tiny_path):
    """vLLM's GLM-4.5 decoder reads use_qk_norm (transformers' GLM-4.5V has no q/k norm)."""
    from r1_mm.run.preflight import family_problems

    config = AutoConfig.from_pretrained(tiny_path(FAMILY, small=True))
    cfg = load_recipe(None, [f"model.name_or_path=tiny:{FAMILY}:small"])
    assert family_problems(cfg, config) == []
    for value in (True, None):
        config.text_config.use_qk_norm = value
        (line,) = family_problems(cfg, config)
        assert line.startswith("GLM-4.5V (glm4v_moe): text_config.use_qk_norm must be false") and "\n" not in line


@pytest.mark.parametrize("task", TASKS)
def test_grouped_equals_naive(tiny_path, synthetic_data, monkeypatch, task):
    model, processor = load(tiny_path, FAMILY)
    compare(monkeypatch, model, processor, prompts_for(processor, synthetic_data[task]))


def test_grouped_equals_naive_eager_attention(tiny_path, synthetic_data, monkeypatch):
    model, processor = load(tiny_path, FAMILY, attn="eager")
    compare(monkeypatch, model, processor, prompts_for(processor, synthetic_data["multi_image"]))


def test_grouped_equals_naive_with_gradient_checkpointing(tiny_path, synthetic_data, monkeypatch):
    model, processor = load(tiny_path, FAMILY, checkpointing=True)
    assert model.is_gradient_checkpointing
    compare(monkeypatch, model, processor, prompts_for(processor, synthetic_data["events"]))


def test_grouped_flash_attention_route(tiny_path, synthetic_data, monkeypatch):
    """transformers' flash integration with the packed varlen sequences (CPU stand-in for the kernel,
    tests/flash_emulation.py); reference: plain sdpa on an identical model."""
    calls = flash_emulation.install(monkeypatch)
    model, processor = load(tiny_path, FAMILY)
    reference, _ = load(tiny_path, FAMILY)
    packed_attention.register()
    model.set_attn_implementation({"text_config": packed_attention.grouped_name("flash_attention_2")})
    compare(monkeypatch, model, processor, prompts_for(processor, synthetic_data["events"]), reference=reference)
    assert calls["varlen"] == model.config.get_text_config().num_hidden_layers


@pytest.mark.parametrize("family", ["glm4v", FAMILY])
def test_hf_engine_samples_images_and_video_with_the_learners_logprobs(tiny_path, synthetic_data, family):
    """The hf engine samples one-image, two-image and video rows; the learner scores all of them in one forward
    (grouped and naive) with the engine's logprobs. The premise: transformers' own placeholder masks fail on that
    mixed forward (families/glm_placeholders), for GLM-4.1V as for GLM-4.5V."""
    path = tiny_path(family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    samples = hf_samples(processor, synthetic_data)
    engine = make_engine("hf", model=model, processor=processor)
    assert engine.name == "hf"
    outs = engine.generate(samples, 3, SamplingSettings(max_tokens=8, temperature=1.0, seed=5))
    assert [len(o.completions) for o in outs] == [3, 3, 3]
    with torch.no_grad():
        with pytest.raises(ValueError, match="Image features and image tokens do not match"):
            max_gap(model, processor, samples, outs, "grouped")
        get_family(family).prepare(model)
        for mode in ("grouped", "naive"):
            assert max_gap(model, processor, samples, outs, mode) < 1e-5, mode


def test_a_deep_copy_of_a_prepared_model_runs_its_own_weights(tiny_path, synthetic_data):
    """The reference model is a deep copy of the policy; the placeholder fix must travel with the copy's class,
    not as a method bound to the policy (the copy would then run the policy's forward with the policy's weights)."""
    import copy

    path = tiny_path(FAMILY)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    get_family(FAMILY).prepare(model)
    twin = copy.deepcopy(model)
    perturb(twin, 0)
    fresh = AutoModelForImageTextToText.from_pretrained(path).eval()  # the twin's weights, in a model of its own
    fresh.load_state_dict(twin.state_dict())
    get_family(FAMILY).prepare(fresh)
    inputs = dict(prompts_for(processor, synthetic_data["events"])[0])
    with torch.no_grad():
        own, copied, expected = (m(**inputs).logits for m in (model, twin, fresh))
    assert type(twin.model) is type(model.model) and type(model.model).__name__ == "Glm4vMoeModel"
    assert (own - copied).abs().max() > 1e-2
    torch.testing.assert_close(copied, expected, atol=1e-5, rtol=0)  # the copy computed with its own weights


def spy_repacks(monkeypatch) -> list[int]:
    """How many MoE layers each in-process reload re-packed for vLLM's CPU kernel (the premise that the
    synced experts really run on it)."""
    from r1_mm.rollout import reload

    seen, original = [], reload.repack_cpu_experts
    monkeypatch.setattr(reload, "repack_cpu_experts", lambda model: seen.append(original(model)) or seen[-1])
    return seen


@pytest.mark.slow
def test_pool_prompt_tokens_and_logprobs_after_three_lora_syncs(tmp_path, synthetic_data):
    """vllm_pool (a server process, float32): image, two-image and video prompts with the learner's prompt ids;
    after each of 3 (perturb, sync) rounds, with LoRA adapters merged into each sync, the sampler's logprobs
    equal the learner's within 1e-4 and differ from the weights' before the sync."""
    import copy

    from r1_mm.models.loading import load_model, load_processor

    family = get_family(FAMILY)
    assert all(family.supports(c) for c in ("vllm_pool", "weight_sync", "video", "lora"))
    cfg = recipe(tmp_path, f"model.name_or_path=tiny:{FAMILY}:small", "model.lora=true", "rollout.pool_size=1")
    processor, model = load_processor(cfg.model), load_model(cfg.model)
    assert model.config.model_type == FAMILY and type(model).__name__ == "PeftModel"
    engine = make_engine("vllm_pool", model=model, processor=processor, cfg=cfg)
    try:
        assert engine.name == "vllm_pool" and engine.info()["server_engines"][0]["dtype"] == "float32"
        samples = samples_for(cfg, processor, synthetic_data)
        assert samples[2].videos and len(samples[1].images) == 2
        sampling = SamplingSettings(max_tokens=6, seed=3)
        for out, sample in zip(engine.generate(samples, 2, sampling), samples, strict=True):
            assert out.prompt_token_ids == sample.inputs["input_ids"][0].tolist()
        banned = media_token_ids(model.config)
        for round_ in range(3):
            before = copy.deepcopy(model)
            perturb(model, round_)
            engine.update_weights(model)
            gaps, stale = [], []
            for sample, out in zip(samples, engine.generate(samples, 2, sampling), strict=True):
                assert out.prompt_token_ids == sample.inputs["input_ids"][0].tolist()
                assert not any(t in banned for c in out.completions for t in c.token_ids)
                sampler = [torch.tensor(c.logprobs) for c in out.completions]
                gaps += [(a - b).abs() for a, b in zip(sampler, learner_logprobs(model, processor, sample, out.completions))]
                stale += [(a - b).abs() for a, b in zip(sampler, learner_logprobs(before, processor, sample, out.completions))]
            gap, old = float(torch.cat(gaps).max()), float(torch.cat(stale).max())
            print("glm4v_moe pool lora round", round_, "sampler vs learner max", gap, "vs before the sync", old)
            assert gap < 1e-4, (round_, gap)
            assert old > 1e-3, (round_, old)  # the sync really changed the engine
    finally:
        engine.close()


BIAS = "model.language_model.layers.1.mlp.gate.e_score_correction_bias"


def with_score_correction_bias(tiny_path, folder):
    """The tiny model with a router score-correction bias that decides the expert choice (the router's sigmoid
    scores of a random model all sit near 0.5): a side that ignored the bias would route other experts."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_path(FAMILY, small=True), folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights[BIAS] = torch.tensor([0.4, -0.4, 0.3, -0.3])
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_colocate_importance_ratio_one_and_learners_prompt_ids(tmp_path, tiny_path, synthetic_data, monkeypatch):
    """GRPO on vllm_colocate (vllm_dtype auto: the float32 learner's), one step per sampling setting (temperature
    0.7, top_p 0.7, top_k 5), the engine synced after every step: importance ratio 1 and the logprobs equal;
    then the synced engine gets the learner's prompt ids for image, two-image and video rows, with its
    logprobs equal to the learner's. The checkpoint carries a router score-correction bias that changes the
    routing (the premise, measured at the end), so vLLM reading the bias as transformers does is shown too."""
    from r1_mm.trainers.grpo import GRPOTrainer

    assert all(get_family(FAMILY).supports(c) for c in ("vllm_colocate", "weight_sync", "video"))
    repacked = spy_repacks(monkeypatch)
    model_dir = with_score_correction_bias(tiny_path, tmp_path / "biased")
    cfg = load_recipe(None, [
        f"model.name_or_path={model_dir}", f"data.train_path={synthetic_data['counting']}",
        f"training.output_dir={tmp_path / 'run'}", "data.format_instruction=null", "media.max_pixels=3136",
        "media.min_pixels=3136", "rollout.num_generations=4", "rollout.max_completion_length=8",
        "training.prompts_per_step=2", "rollout.engine=vllm_colocate", "rollout.vllm_max_model_len=2048",
        "data.max_prompt_length=1024", "algorithm.grpo.beta=0.04", "training.learning_rate=1e-2",
        "logging.progress_bar=false", "rewards.functions=[{name: numeric, kwargs: {require_tag: false}}]"])
    trainer = GRPOTrainer(cfg)
    try:
        assert trainer.engine.name == "vllm_colocate" and trainer.engine.info()["dtype"] == "float32"
        for step, (name, temperature, top_p, top_k) in enumerate(ENGINE_STEPS):
            trainer.step = step
            trainer.cfg.rollout.temperature, trainer.cfg.rollout.top_p, trainer.cfg.rollout.top_k = temperature, top_p, top_k
            metrics = trainer.train_step()
            assert "rollout/is_ratio_mean" in metrics, name
            print(name, {k: metrics[k] for k in ("rollout/is_ratio_mean", "rollout/logprob_abs_diff_max")})
            assert metrics["rollout/is_ratio_mean"] == pytest.approx(1.0, abs=1e-4), (name, metrics)
            assert metrics["rollout/logprob_abs_diff_max"] < 1e-4, (name, metrics)
        assert repacked and all(n == 1 for n in repacked)  # the synced experts run on vLLM's CPU MoE kernel
        model, processor = trainer.learner.unwrapped, trainer.processor
        samples = samples_for(recipe(tmp_path, f"model.name_or_path={model_dir}"), processor, synthetic_data)
        assert samples[2].videos and len(samples[1].images) == 2
        outs = trainer.engine.generate(samples, 2, SamplingSettings(max_tokens=6, seed=3))
        gaps, unbiased = [], []
        for sample, out in zip(samples, outs, strict=True):
            assert out.prompt_token_ids == sample.inputs["input_ids"][0].tolist()
            sampler = [torch.tensor(c.logprobs) for c in out.completions]
            gaps += [(a - b).abs() for a, b in zip(sampler, learner_logprobs(model, processor, sample, out.completions))]
        bias = dict(model.named_buffers())[BIAS]
        assert torch.equal(bias, torch.tensor([0.4, -0.4, 0.3, -0.3]))
        bias.zero_()
        for sample, out in zip(samples, outs, strict=True):
            sampler = [torch.tensor(c.logprobs) for c in out.completions]
            unbiased += [(a - b).abs() for a, b in zip(sampler, learner_logprobs(model, processor, sample, out.completions))]
        gap, without = float(torch.cat(gaps).max()), float(torch.cat(unbiased).max())
        print("glm4v_moe colocate after 3 GRPO steps: sampler vs learner max", gap, "learner without the bias", without)
        assert gap < 1e-4, gap
        assert without > 1e-3, without  # the premise: the bias changes the routing
    finally:
        trainer.close()
