"""What the checkpoint's config says a recipe cannot do, refused at load in one line (before vLLM or
the learner starts): flash attention on a float32 load, and a vLLM context past the checkpoint's
positions (vLLM refused it only at engine start, after the learner had loaded)."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from r1_mm.config.recipe import load_recipe
from r1_mm.run.preflight import check_model_config


@pytest.fixture(scope="module")
def tiny_config(tiny_path):
    config = AutoConfig.from_pretrained(tiny_path("qwen2_5_vl"))
    assert config.get_text_config().max_position_embeddings == 8192  # the premise of the numbers below
    return config


@pytest.mark.parametrize("dtype, refused", [("auto", True), ("bfloat16", False)])  # explicit float32: refused by
# the recipe check itself (test_config)
def test_flash_attention_needs_a_half_precision_load(tiny_config, dtype, refused):
    tiny_config.dtype = "float32"  # an fp32 checkpoint: what dtype=auto loads
    cfg = load_recipe(None, ["model.attn_implementation=flash_attention_2", f"model.dtype={dtype}",
                             "training.forward_mode=naive"])
    found = check_model_config(cfg, tiny_config)
    assert bool(found) is refused
    if refused:
        assert len(found) == 1 and "model.dtype=bfloat16" in found[0] and "\n" not in found[0]


def test_vllm_context_past_the_checkpoints_positions(tiny_config, monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    long = ["rollout.vllm_max_model_len=9000"]
    found = check_model_config(load_recipe(None, ["rollout.engine=vllm_colocate", *long]), tiny_config)
    assert len(found) == 1 and "9000" in found[0] and "8192" in found[0]
    assert check_model_config(load_recipe(None, ["rollout.engine=vllm_pool", "rollout.vllm_max_model_len=8192"]),
                              tiny_config) == []
    assert check_model_config(load_recipe(None, ["rollout.engine=hf", *long]), tiny_config) == []
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # vLLM's own override
    assert check_model_config(load_recipe(None, ["rollout.engine=vllm_colocate", *long]), tiny_config) == []
