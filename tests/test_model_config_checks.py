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


def test_a_family_r1_mm_has_not_verified_is_refused_in_one_line():
    """Never train an unverified architecture with numbers nobody checked: a model_type outside
    models/families is refused by the load checks (before any weights load) on the vLLM engines, for
    training and for rollout-only jobs alike; with the hf engine it passes them, and the training run
    checks the cheap contract before step 1 (tests/test_check_model.py)."""
    from r1_mm.models.families import FAMILIES

    config = AutoConfig.for_model("mistral", hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=64)
    assert "mistral" not in FAMILIES  # the premise
    for learner in (True, False):
        for engine in ("vllm_colocate", "vllm_pool"):
            found = check_model_config(load_recipe(None, ["training.forward_mode=naive", f"rollout.engine={engine}"]),
                                       config, learner=learner)
            assert len(found) == 1 and "model_type 'mistral'" in found[0] and "\n" not in found[0], found
            assert "rollout.engine=hf only" in found[0]
        assert check_model_config(load_recipe(None, ["training.forward_mode=naive", "rollout.engine=hf"]), config,
                                  learner=learner) == []


def test_a_capability_the_family_does_not_have_is_refused(tiny_config, monkeypatch):
    """A family states per capability tested or why not; a recipe using a refused one stops at load."""
    import dataclasses

    from r1_mm.models.families import FAMILIES, get_family

    family = get_family("qwen2_5_vl")
    limited = dataclasses.replace(family, support={**family.support, "grouped": "packed rows are not checked",
                                                   "vllm_pool": "the pool's processor resizes frames"})
    monkeypatch.setattr(FAMILIES, "_entries", {**FAMILIES._entries, "qwen2_5_vl": limited})
    grouped = check_model_config(load_recipe(None, ["training.forward_mode=grouped"]), tiny_config)
    assert len(grouped) == 1 and "packed rows are not checked" in grouped[0] and "forward_mode=naive" in grouped[0]
    assert check_model_config(load_recipe(None, ["training.forward_mode=naive"]), tiny_config) == []
    pool = check_model_config(load_recipe(None, ["training.forward_mode=naive", "rollout.engine=vllm_pool"]),
                              tiny_config, learner=False)
    assert len(pool) == 1 and "rollout.engine=vllm_pool" in pool[0]


@pytest.mark.parametrize(("model_type", "fields", "refused"), [
    ("qwen2", {}, None),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}, "sliding_attention"),
    ("gemma3_text", {}, None),  # Gemma 3: its window is kept per packed sequence (tests/test_family_gemma3.py)
    ("gemma2", {}, "sliding_attention"),  # the same layers, not verified (and logit soft-capping)
    ("qwen3_next", {}, None),  # Gated DeltaNet layers: each completion starts from its prompt's states
    ("mistral", {"sliding_window": 4096}, "sliding_window=4096"),
    ("mistral", {"sliding_window": None}, None),
])
def test_grouped_forward_refuses_layers_it_cannot_pack(model_type, fields, refused):
    """The packed layout is exact for full- and linear-attention layers only; a config with sliding-window
    layers is refused for forward_mode=grouped whatever flag names them."""
    from r1_mm.models.forward.packed_attention import PackedAttentionError, check_supported

    config = AutoConfig.for_model(model_type, **fields)
    if refused is None:
        check_supported(config, "sdpa")
        return
    with pytest.raises(PackedAttentionError, match=refused):
        check_supported(config, "sdpa")
