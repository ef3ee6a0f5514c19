"""The tiled LM head (token_scores) gives the full-logits values: logprobs, entropy and gradients at 1e-5
in float32, across vocabulary tiles and token chunks, with temperature, suppressed media tokens and
the prompt position shared by G completions; with LoRA; without touching generation; and at the real
vocabulary without building (tokens x vocabulary) tensors. ZeRO-3: test_backends.py."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from r1_mm.config.recipe import DataConfig, MediaConfig
from r1_mm.data import PromptBuilder
from r1_mm.data.loading import default_media_root, read_rows
from r1_mm.models.forward import token_scores
from r1_mm.models.forward.grouped import grouped_logprobs, pack_groups, token_logprobs
from r1_mm.rollout.base import media_token_ids

G = 3


def small_tiles(monkeypatch):
    """Many vocabulary tiles and token chunks on the tiny model (512-token vocabulary, ~60 scored tokens)."""
    import trl.kernels.chunked_logprob as kernel

    monkeypatch.setattr(token_scores, "VOCAB_TILE", 100)
    monkeypatch.setattr(kernel, "TOKEN_CHUNK_SIZE", 16)


def setup(tiny_path, synthetic_data, lora=False):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_path("qwen2_5_vl")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    model.train()
    data = synthetic_data["counting"]
    builder = PromptBuilder(processor, DataConfig(), MediaConfig(), default_media_root(data))
    prompts = [builder.prepare(row, i).inputs for i, row in enumerate(read_rows(data)[:2])]
    gen = torch.Generator().manual_seed(0)
    completions = [torch.randint(0, 400, (n,), generator=gen).tolist() for n in (9, 4, 12, 1, 7, 10)]
    packed = pack_groups(model, [dict(p) for p in prompts], completions, G, processor.tokenizer.pad_token_id)
    return model, processor, packed


def full_logits(model, packed, temperature, suppressed):
    """The reference: the model's own forward with logits at the scored positions, then log-softmax."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = inner._r1mm_original_forward(**packed.model_kwargs(model), logits_to_keep=packed.logits_index, use_cache=False)
    lp, ent = token_logprobs(out.logits[0], packed.targets, temperature, True, suppressed)
    return packed.to_completion_grid(lp), packed.to_completion_grid(ent)


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(model, packed, temperature=0.7):
    suppressed = media_token_ids(model.config)
    assert suppressed  # the media placeholders are masked in both routes
    lp_f, ent_f = grouped_logprobs(model, packed, temperature=temperature, with_entropy=True, suppressed_ids=suppressed)
    weights = torch.linspace(-1.0, 1.5, lp_f.numel()).reshape(lp_f.shape)
    g_fused = grads_of(model, (lp_f * weights).sum() + (ent_f * weights.flip(0)).sum())
    lp_r, ent_r = full_logits(model, packed, temperature, suppressed)
    g_full = grads_of(model, (lp_r * weights).sum() + (ent_r * weights.flip(0)).sum())
    mask = packed.completion_mask.bool()
    torch.testing.assert_close(lp_f[mask], lp_r[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_f[mask], ent_r[mask], atol=1e-5, rtol=0)
    assert set(g_fused) == set(g_full) and g_full
    for name, g in g_full.items():
        torch.testing.assert_close(g_fused[name], g, atol=1e-5, rtol=1e-4, msg=name)
    return g_full


def test_tiled_head_equals_full_logits(tiny_path, synthetic_data, monkeypatch):
    small_tiles(monkeypatch)
    model, _, packed = setup(tiny_path, synthetic_data)
    assert packed.logits_index.numel() > 16 and model.config.get_text_config().vocab_size > 100  # several chunks, tiles
    assert len(set(packed.logits_index.tolist())) < packed.logits_index.numel()  # shared prompt positions repeat
    grads = compare(model, packed)
    assert grads["lm_head.weight"].abs().sum() > 0


def test_tiled_head_equals_full_logits_with_lora(tiny_path, synthetic_data, monkeypatch):
    small_tiles(monkeypatch)
    model, _, packed = setup(tiny_path, synthetic_data, lora=True)
    grads = compare(model, packed, temperature=1.0)
    assert any("lora_" in name for name in grads)


def test_generation_is_untouched(tiny_path, synthetic_data):
    """The scoring forward keeps the original signature (generate() inspects it) and generate's results."""
    import inspect

    model, processor, packed = setup(tiny_path, synthetic_data)
    model.eval()
    row = read_rows(synthetic_data["counting"])[0]
    inputs = PromptBuilder(processor, DataConfig(), MediaConfig(),
                           default_media_root(synthetic_data["counting"])).prepare(row, 0).inputs
    before = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    grouped_logprobs(model, packed)  # installs the scoring forward and uses it
    assert token_scores.is_installed(model)
    assert "pixel_values" in inspect.signature(model.forward).parameters
    after = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(before, after)


REAL_VOCAB = """
import json, torch
from r1_mm.core.memory import peak_rss_bytes
from transformers import AutoModelForImageTextToText
from r1_mm.models.forward.grouped import grouped_logprobs, pack_groups
model = AutoModelForImageTextToText.from_pretrained({path!r})
vocab = model.config.get_text_config().vocab_size
gen = torch.Generator().manual_seed(0)
ids = torch.randint(0, 400, (1, 64), generator=gen)
prompt = {{"input_ids": ids, "attention_mask": torch.ones_like(ids)}}
completions = [torch.randint(0, 400, (512,), generator=gen).tolist() for _ in range(8)]
packed = pack_groups(model, [prompt], completions, 8, 0)
before = peak_rss_bytes()
logps, entropy = grouped_logprobs(model, packed, with_entropy=True, suppressed_ids=[1, 2])
(logps.sum() + entropy.sum()).backward()
grown = peak_rss_bytes() - before
print(json.dumps({{"grown": grown, "vocab": vocab, "scored": int(packed.targets.numel()),
                  "finite": bool(torch.isfinite(logps).all() and torch.isfinite(entropy).all())}}))
"""


def test_real_vocabulary_never_builds_the_logits(tiny_cache):
    """Qwen2.5-VL's 151,936-token head, G=8 x 512-token completions: one float32 (4,096 x 151,936) logits
    tensor is 2.5 GB, and the full-logits path grew the process by 15.5 GB; the tiled head grows it by less
    than half of that one tensor (0.88 GB measured here)."""
    from r1_mm.models.tiny import TinySpec, tiny_model_path

    path = tiny_model_path(TinySpec(model_vocab_size=151_936), cache_dir=tiny_cache)
    proc = subprocess.run([sys.executable, "-c", REAL_VOCAB.format(path=str(path))], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["vocab"] == 151_936 and result["scored"] == 4096 and result["finite"]
    one_logits_tensor = result["scored"] * result["vocab"] * 4
    assert result["grown"] < one_logits_tensor / 2, result
