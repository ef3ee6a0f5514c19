"""The grouped forward equals the library's naive forward over G repeated sequences (float32, 1e-5),
through every attention kernel it has (sdpa, eager, flash-attention's varlen route) and under the
sampler's top-p / top-k truncation (the truncated head), and never hands the model an L x L mask."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from r1_mm.config.recipe import DataConfig, MediaConfig
from r1_mm.data import PromptBuilder
from r1_mm.data.loading import default_media_root, read_rows
from r1_mm.models.forward import packed_attention, truncated_scores
from r1_mm.models.forward.grouped import grouped_logprobs, naive_logprobs, pack_groups
from r1_mm.models.forward.packed_linear_attention import LINEAR_CALLS
from r1_mm.models.forward.truncated_scores import Truncation
from r1_mm.rollout.base import media_token_ids
from r1_mm.testing import synthetic

from . import flash_emulation

G = 3
# completion lengths differ so completions are right-padded inside the packed rows
LENGTHS = [5, 9, 3, 7, 1, 4]


@pytest.fixture(scope="module")
def long_video_task(tmp_path_factory):
    """80 s videos sampled at 4 frames: 20 s per frame, so M-RoPE temporal ids jump far past the text."""
    return synthetic.make_event_video_task(tmp_path_factory.mktemp("long"), 2, seed=9, duration_s=80.0, fps=1,
                                           size=56)


def load(tiny_path, family, attn="sdpa", checkpointing=False):
    path = tiny_path(family)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, AutoProcessor.from_pretrained(path)


def prompts_for(processor, data_path, media=None, vary_length=True):
    rows = read_rows(data_path)
    builder = PromptBuilder(processor, DataConfig(), media or MediaConfig(), default_media_root(data_path))
    if vary_length:  # prompts of different lengths -> left padding in the batch
        rows[1] = dict(rows[1], prompt=rows[1]["prompt"] + " Look carefully, then answer with one number only.")
    return [builder.prepare(rows[i], i).inputs for i in range(2)]


def completions(vocab):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(model, processor, prompts, temperature=0.7, reference=None):
    """Grouped on ``model`` vs naive on ``reference`` (default: the same model, attention as loaded)."""
    reference = reference or model
    comps = completions(len(processor.tokenizer) - 16)  # ordinary tokens (specials sit at the end)
    pad = processor.tokenizer.pad_token_id
    packed = pack_groups(model, [dict(p) for p in prompts], comps, G, pad)
    kernel = packed_attention.base_implementation(packed_attention.text_config(model)._attn_implementation)
    text = model.config.get_text_config()
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    # softmax-attention layers (full or sliding-window: the packed kernel serves both) and Gated DeltaNet layers
    layers, linear = types.count("full_attention") + types.count("sliding_attention"), types.count("linear_attention")
    before = packed_attention.KERNEL_CALLS[kernel], LINEAR_CALLS["linear_attention"]
    lp_g, ent_g = grouped_logprobs(model, packed, temperature=temperature, with_entropy=True)
    # the packed kernel served every attention layer, the packed linear attention every Gated DeltaNet layer
    assert packed_attention.KERNEL_CALLS[kernel] - before[0] == layers
    assert LINEAR_CALLS["linear_attention"] - before[1] == linear
    weights = torch.linspace(0.5, 1.5, lp_g.numel()).reshape(lp_g.shape)  # a loss that touches every token
    before_backward = packed_attention.KERNEL_CALLS[kernel], LINEAR_CALLS["linear_attention"]
    (lp_g * weights).sum().backward()
    # gradient checkpointing recomputes every layer's forward (the layout survives the recompute)
    recomputed = packed_attention.KERNEL_CALLS[kernel] - before_backward[0]
    assert recomputed == (layers if model.is_gradient_checkpointing else 0)
    assert LINEAR_CALLS["linear_attention"] - before_backward[1] == (linear if model.is_gradient_checkpointing else 0)
    g_grouped = grads(model)
    model.zero_grad()
    calls = sum(packed_attention.KERNEL_CALLS.values())
    lp_n, ent_n = naive_logprobs(reference, [dict(p) for p in prompts], comps, G, pad, temperature=temperature,
                                 with_entropy=True)
    assert sum(packed_attention.KERNEL_CALLS.values()) == calls  # the reference ran the library's attention
    (lp_n * weights).sum().backward()
    g_naive = grads(reference)
    reference.zero_grad()
    mask = packed.completion_mask.bool()
    assert mask.sum(-1).tolist() == LENGTHS
    torch.testing.assert_close(lp_g[mask], lp_n[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_g[mask], ent_n[mask], atol=1e-4, rtol=0)
    assert set(g_grouped) == set(g_naive) and len(g_naive) > 10
    largest = max(float(g.abs().max()) for g in g_naive.values())
    for name, g in g_naive.items():
        # the floor (1e-3 of the largest gradient of the model): a key-projection bias has zero true
        # gradient (softmax ignores a shift shared by all keys), so both routes return float noise there
        scale = g.abs().max().clamp(min=1e-3 * largest)
        assert (g_grouped[name] - g).abs().max() / scale < 1e-4, name
    # the vision tower received gradient through the grouped route too
    assert any(("visual" in n or "vision_tower" in n or "vision_model" in n) and g.abs().sum() > 0 for n, g in g_grouped.items())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v"])
@pytest.mark.parametrize("task", ["counting", "multi_image", "events"])
def test_grouped_equals_naive(tiny_path, synthetic_data, family, task):
    model, processor = load(tiny_path, family)
    compare(model, processor, prompts_for(processor, synthetic_data[task]))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v"])
def test_grouped_equals_naive_with_gradient_checkpointing(tiny_path, synthetic_data, family):
    model, processor = load(tiny_path, family, checkpointing=True)
    assert model.is_gradient_checkpointing
    compare(model, processor, prompts_for(processor, synthetic_data["events"]))
    compare(model, processor, prompts_for(processor, synthetic_data["multi_image"]))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v"])
def test_grouped_equals_naive_eager_attention(tiny_path, synthetic_data, family):
    model, processor = load(tiny_path, family, attn="eager")
    compare(model, processor, prompts_for(processor, synthetic_data["counting"]))


TRUNCATIONS = {"top_p": Truncation(top_p=0.7), "top_k": Truncation(top_k=5),
               "top_p_and_top_k": Truncation(top_p=0.6, top_k=50)}


def sampled_completions(model, processor, prompts, temperature, truncation, suppressed):
    """G completions per prompt drawn by transformers' generate under the truncation (as the hf engine
    samples), cut to LENGTHS: every scored token lies in the sampler's kept set, as in training."""
    longest = max(LENGTHS)
    out = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            torch.manual_seed(i)
            ids = model.generate(**p, do_sample=True, temperature=temperature, top_p=truncation.top_p,
                                 top_k=truncation.top_k or 0, max_new_tokens=longest, min_new_tokens=longest,
                                 num_return_sequences=G, suppress_tokens=suppressed,
                                 pad_token_id=processor.tokenizer.pad_token_id)
            new = ids[:, p["input_ids"].shape[1]:]
            out += [new[j, :LENGTHS[i * G + j]].tolist() for j in range(G)]
    return out


def spy_kept_sizes(monkeypatch) -> list[torch.Tensor]:
    """Record the kept-set size of every row the truncated head scores (the premise of the tests below)."""
    sizes: list[torch.Tensor] = []
    original = truncated_scores.kept_threshold

    def spied(scaled, truncation):
        threshold = original(scaled, truncation)
        sizes.append((scaled >= threshold[:, None]).sum(-1))
        return threshold

    monkeypatch.setattr(truncated_scores, "kept_threshold", spied)
    return sizes


@pytest.mark.parametrize("name", list(TRUNCATIONS))
def test_grouped_equals_naive_under_truncation(tiny_path, synthetic_data, monkeypatch, name):
    """With the sampler's top-p and/or top-k the learner scores through the truncated head
    (truncated_scores): the grouped forward's truncated logprobs, their untruncated twins (the KL term's),
    the truncated entropy and the gradients of all three equal the naive forward's. Small chunks and
    vocabulary tiles, so both routes cut their (different) scored rows at different places."""
    truncation, temperature = TRUNCATIONS[name], 0.8
    monkeypatch.setattr(truncated_scores, "ROW_ELEMENTS", 16 * 1024)  # 16 rows per chunk at the 1,024-token vocabulary
    monkeypatch.setattr(truncated_scores, "VOCAB_TILE", 100)
    model, processor = load(tiny_path, "qwen2_5_vl")
    vocab = model.config.get_text_config().vocab_size
    prompts = prompts_for(processor, synthetic_data["counting"])
    suppressed = media_token_ids(model.config)
    comps = sampled_completions(model, processor, prompts, temperature, truncation, suppressed)
    pad = processor.tokenizer.pad_token_id
    options = dict(temperature=temperature, with_entropy=True, suppressed_ids=suppressed, truncation=truncation,
                   with_full_logps=True)
    sizes = spy_kept_sizes(monkeypatch)

    packed = pack_groups(model, [dict(p) for p in prompts], comps, G, pad)
    lp_g, ent_g, full_g = grouped_logprobs(model, packed, **options)
    grouped_sizes, sizes[:] = torch.cat(sizes), []
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(lp_g.shape, generator=gen) for _ in range(3)]  # a loss touching every output of every token
    (lp_g * w[0] + ent_g * w[1] + full_g * w[2]).sum().backward()
    g_grouped = grads(model)
    model.zero_grad()

    lp_n, ent_n, full_n = naive_logprobs(model, [dict(p) for p in prompts], comps, G, pad, **options)
    naive_sizes = torch.cat(sizes)
    (lp_n * w[0] + ent_n * w[1] + full_n * w[2]).sum().backward()
    g_naive = grads(model)
    model.zero_grad()

    mask = packed.completion_mask.bool()
    # the premise: both routes ran the truncated head, over several chunks, and it cut the vocabulary
    assert grouped_sizes.numel() == mask.sum() and naive_sizes.numel() == mask.numel()
    assert (grouped_sizes < vocab).all() and (naive_sizes < vocab).any()
    if truncation.top_k:
        assert (grouped_sizes <= truncation.top_k).all()
    if truncation.top_k and truncation.top_p < 1:
        assert (grouped_sizes < truncation.top_k).any()  # top-p cut inside the top-k too
    assert (lp_g[mask] > full_g[mask] + 1e-3).all()  # renormalised over the kept set: every logprob rose
    torch.testing.assert_close(lp_g[mask], lp_n[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(full_g[mask], full_n[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_g[mask], ent_n[mask], atol=1e-4, rtol=0)
    assert set(g_grouped) == set(g_naive) and len(g_naive) > 10 and "lm_head.weight" in g_naive
    largest = max(float(g.abs().max()) for g in g_naive.values())
    for param, g in g_naive.items():
        scale = g.abs().max().clamp(min=1e-3 * largest)  # as in compare(): zero-gradient biases carry float noise
        assert (g_grouped[param] - g).abs().max() / scale < 1e-4, param


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v"])
def test_grouped_flash_attention_route(tiny_path, synthetic_data, monkeypatch, family):
    """What a recipe's flash_attention_2 runs on a GPU: transformers' flash integration called with the
    packed varlen sequences. The CUDA kernel itself is replaced by a CPU stand-in (tests/flash_emulation.py);
    the naive reference runs plain sdpa on an identical copy of the model."""
    calls = flash_emulation.install(monkeypatch)
    model, processor = load(tiny_path, family)
    reference, _ = load(tiny_path, family)
    packed_attention.register()
    model.set_attn_implementation({"text_config": packed_attention.grouped_name("flash_attention_2")})
    compare(model, processor, prompts_for(processor, synthetic_data["events"]), reference=reference)
    assert calls["varlen"] == model.config.get_text_config().num_hidden_layers  # the kernel really ran, once a layer


def test_layers_get_the_layout_not_a_mask(tiny_path, synthetic_data):
    """Every decoder layer receives the packed layout (index tensors), never a dense attention mask."""
    model, processor = load(tiny_path, "qwen2_5_vl")
    seen = []
    for layer in model.model.language_model.layers:
        layer.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["attention_mask"]), with_kwargs=True)
    prompts = prompts_for(processor, synthetic_data["counting"])
    packed = pack_groups(model, [dict(p) for p in prompts], completions(200), G, processor.tokenizer.pad_token_id)
    grouped_logprobs(model, packed)
    assert len(seen) == len(model.model.language_model.layers)
    assert all(isinstance(m, packed_attention.PackedLayout) for m in seen)
    layout = seen[0]
    assert layout.num_sequences == 2 + len(LENGTHS)  # each prompt once, each completion once
    assert layout.max_q <= max(prompts[i]["input_ids"].shape[1] for i in range(2))


LONG_PROMPT = """
import json, sys, torch
from r1_mm.core.memory import peak_rss_bytes
from transformers import AutoModelForImageTextToText
from r1_mm.models.forward.grouped import grouped_logprobs, pack_groups
P, G, C = {p}, 8, 64
model = AutoModelForImageTextToText.from_pretrained({path!r}, attn_implementation="sdpa")
ids = torch.randint(0, 400, (1, P), generator=torch.Generator().manual_seed(0))
prompt = {{"input_ids": ids, "attention_mask": torch.ones_like(ids)}}
comps = [torch.randint(0, 400, (C,)).tolist() for _ in range(G)]
before = peak_rss_bytes()
packed = pack_groups(model, [prompt], comps, G, 0)
logps, _ = grouped_logprobs(model, packed, with_entropy=True)
logps.sum().backward()
grown = peak_rss_bytes() - before
print(json.dumps({{"grown": grown, "tokens": packed.input_ids.shape[1], "finite": bool(torch.isfinite(logps).all())}}))
"""


def test_16k_token_prompt_needs_no_quadratic_memory(tiny_path):
    """A 16,384-token prompt with G=8 x 64-token completions (L = 16,896): forward + backward grows the
    process by less than ONE float32 L x L mask (1.1 GiB); the 4-D-mask route it replaced grew 2.7 GiB."""
    code = LONG_PROMPT.format(p=16384, path=str(tiny_path("qwen2_5_vl")))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    length = result["tokens"]
    assert length == 16384 + 8 * 64 and result["finite"]
    assert result["grown"] < length * length * 4, result


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v"])
def test_long_video_temporal_positions_past_the_text(tiny_path, long_video_task, family):
    model, processor = load(tiny_path, family)
    media = MediaConfig(nframes=4, video_total_pixels=10**9)
    prompts = prompts_for(processor, long_video_task, media)
    if family == "qwen2_5_vl":
        from r1_mm.models.forward.grouped import prompt_positions

        p = prompts[0]
        positions = prompt_positions(model, {k: v for k, v in p.items()})
        # positions run past the prompt's own length: "P + rope_deltas" shortcuts would be wrong here
        assert int(positions.max()) > p["input_ids"].shape[1] + 16
    compare(model, processor, prompts)


@pytest.fixture(scope="module")
def two_image_sizes(tmp_path_factory):
    """One 112 px and one 56 px image prompt: LLaVA-OneVision splits them into 5 and 2 anyres patches."""
    root = tmp_path_factory.mktemp("sizes")
    big = synthetic.make_counting_task(root, 2, seed=1, size=112)
    small = synthetic.make_counting_task(root, 2, seed=2, size=56, box=12, name="small")
    return big, small


def llava_prompts(processor, paths):
    media = MediaConfig(max_pixels=28 * 28 * 64)
    return [PromptBuilder(processor, DataConfig(), media, default_media_root(p)).prepare(read_rows(p)[0], 0).inputs
            for p in paths]


def test_llava_onevision_batched_images_match_each_prompt_alone(tiny_path, two_image_sizes):
    """Prompts with different anyres patch counts are zero-padded to a batch (as the processor pads
    one); the model must then score each exactly as it scores that prompt alone."""
    model, processor = load(tiny_path, "llava_onevision")
    model.eval()
    prompts = llava_prompts(processor, two_image_sizes)
    assert prompts[0]["pixel_values"].shape[1] != prompts[1]["pixel_values"].shape[1]  # padding is exercised
    comps = completions(len(processor.tokenizer) - 16)
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        both, _ = naive_logprobs(model, [dict(p) for p in prompts], comps, G, pad)
        alone = [naive_logprobs(model, [dict(p)], comps[i * G:(i + 1) * G], G, pad)[0] for i, p in enumerate(prompts)]
    for i, lp in enumerate(alone):
        rows = both[i * G:(i + 1) * G, :lp.shape[1]]
        torch.testing.assert_close(rows, lp, atol=1e-5, rtol=0)


def test_llava_onevision_grouped_equals_naive(tiny_path, two_image_sizes):
    model, processor = load(tiny_path, "llava_onevision")
    compare(model, processor, llava_prompts(processor, two_image_sizes))


def test_grouped_flash_model_still_generates_and_scores_unpacked(tiny_path, synthetic_data, monkeypatch):
    """With flash_attention_2 the grouped forward renames the model's attention; calls without a packed
    layout (the hf engine's generate and prefill, evaluation) must still reach transformers' flash route,
    which once passed the grouped name to its kernel import and failed ('Could not find the currently
    requested flash attention implementation'). Kernel replaced by the CPU stand-in; reference: sdpa."""
    calls = flash_emulation.install(monkeypatch)
    model, processor = load(tiny_path, "qwen2_5_vl")
    reference, _ = load(tiny_path, "qwen2_5_vl")
    model.eval(), reference.eval()
    packed_attention.register()
    model.set_attn_implementation({"text_config": packed_attention.grouped_name("flash_attention_2")})
    assert packed_attention.is_enabled(model)
    inputs = prompts_for(processor, synthetic_data["counting"], vary_length=False)[0]
    with torch.no_grad():
        logits = model(**inputs).logits
        expected = reference(**inputs).logits
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        reference_generated = reference.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert generated.tolist() == reference_generated.tolist()
    assert calls["varlen"] + calls["dense"] > 0  # the flash stand-in served those calls, not sdpa


def test_unknown_processor_outputs_are_refused_in_both_modes():
    """An output r1-mm does not hand to the model (a processor output no verified family has) stops both forwards with
    one message, which no longer sends the user to forward_mode=naive (that route fails the same way)."""
    from r1_mm.models.forward.grouped import GroupedForwardError, merge_vision_inputs

    prompt = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long),
              "unknown_processor_output": torch.zeros(1, 3, dtype=torch.long)}
    for repeats in (1, 3):  # the grouped forward merges once, the naive one G times
        with pytest.raises(GroupedForwardError, match=r"grouped or naive\): this model's family is not verified"):
            merge_vision_inputs([prompt], repeats=repeats)
