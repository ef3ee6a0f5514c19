"""The family registry: one module per model_type, README's table generated from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1_mm.models.families import FAMILIES, UnsupportedModelError, family_of, get_family
from r1_mm.models.families.base import CAPABILITIES, ModelFamily
from r1_mm.models.families.table import support_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_is_the_generated_one():
    assert support_table() in (ROOT / "README.md").read_text(), (
        "README.md's families table is stale: paste r1_mm.models.families.table.support_table()")


def test_every_family_states_every_capability_and_builds_by_its_name():
    for name in FAMILIES.names():
        family = get_family(name)
        assert family.model_type == name and set(family.support) == set(CAPABILITIES)
        assert (ROOT / "r1_mm" / "models" / "families" / f"{name}.py").exists()  # one module per family
    with pytest.raises(ValueError, match="must state every capability"):
        ModelFamily(model_type="x", display_name="X", build_tiny=lambda s, t: (None, None), chat_template="",
                    support={"grouped": "tested"})


def test_unknown_model_type_is_refused_with_a_suggestion():
    class Config:
        model_type = "qwen3vl"

    with pytest.raises(UnsupportedModelError, match="did you mean 'qwen3_vl'"):
        family_of(Config())


def test_fused_experts_are_saved_and_sent_in_the_checkpoints_layout(tiny_path):
    """Qwen3-VL-MoE's checkpoints store experts as (experts, in, out), transformers holds them as
    (experts, out, in), and vLLM's loader always transposes them: the tiny model's file and every sync
    must carry the checkpoint's layout (transformers' own save writes the in-memory one)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from r1_mm.models.weights import iter_policy_weights, policy_weight_specs

    path = tiny_path("qwen3_vl_moe", small=True)
    model = AutoModelForImageTextToText.from_pretrained(path)
    text = model.config.text_config
    memory = dict(model.named_parameters())
    name = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert list(memory[name].shape) == [text.num_experts, 2 * text.moe_intermediate_size, text.hidden_size]
    with safe_open(str(path / "model.safetensors"), "pt") as saved:
        assert saved.get_slice(name).get_shape() == [text.num_experts, text.hidden_size, 2 * text.moe_intermediate_size]
        sent = dict(iter_policy_weights(model))
        assert set(sent) == set(saved.keys())
        assert all(torch.equal(sent[k], saved.get_tensor(k)) for k in saved.keys())  # noqa: SIM118
    assert {n: s for n, s, _ in policy_weight_specs(model)}[name] == list(sent[name].shape)
    # and transformers reads the file back into the model it came from
    assert torch.equal(memory[name], torch.transpose(sent[name], 1, 2))


def test_a_config_vllm_would_read_differently_is_refused_in_one_line(tiny_path):
    from transformers import AutoConfig

    from r1_mm.config.recipe import load_recipe
    from r1_mm.run.preflight import family_problems

    config = AutoConfig.from_pretrained(tiny_path("qwen3_vl_moe", small=True))
    cfg = load_recipe(None, ["model.name_or_path=tiny:qwen3_vl_moe:small"])
    assert family_problems(cfg, config) == []
    del config.text_config.norm_topk_prob
    (line,) = family_problems(cfg, config)
    assert line.startswith("Qwen3-VL-MoE (qwen3_vl_moe): text_config.norm_topk_prob must be true") and "\n" not in line


def test_glm4v_config_without_attention_bias_is_refused_in_one_line(tiny_path):
    """vLLM builds GLM-4.1V's q/k/v without biases unless text_config.attention_bias is true (transformers
    always has them): synced biases were dropped, up to 0.56 nats per token between sampler and learner."""
    from transformers import AutoConfig

    from r1_mm.config.recipe import load_recipe
    from r1_mm.run.preflight import family_problems

    config = AutoConfig.from_pretrained(tiny_path("glm4v", small=True))
    cfg = load_recipe(None, ["model.name_or_path=tiny:glm4v:small"])
    assert config.text_config.attention_bias is True and family_problems(cfg, config) == []
    del config.text_config.attention_bias
    (line,) = family_problems(cfg, config)
    assert line.startswith("GLM-4.1V (glm4v): text_config.attention_bias must be true") and "\n" not in line


def test_video_requests_tell_vllm_not_to_sample_the_frames_again():
    """vLLM's GLM-4.1V processor reads do_sample_frames from each video's metadata (default: sample again),
    so a family that sets it in its processor kwargs gets it in the metadata too; without it vLLM re-sampled
    16 decoded frames as if they were the 32-frame source and failed (IndexError). Others are unchanged."""
    import numpy as np

    from r1_mm.rollout.vllm_common import media_request

    frames, metadata = np.zeros((2, 28, 28, 3), dtype=np.uint8), {"fps": 4.0, "frames_indices": [0, 2]}
    glm = media_request("p", [], [(frames, metadata)], dict(get_family("glm4v").vllm_processor_kwargs))
    assert glm["multi_modal_data"]["video"][0][1] == {**metadata, "do_sample_frames": False}
    assert glm["mm_processor_kwargs"] == {"do_resize": False, "do_sample_frames": False}
    qwen = media_request("p", [], [(frames, metadata)], dict(get_family("qwen2_vl").vllm_processor_kwargs))
    assert qwen["multi_modal_data"]["video"][0][1] == metadata


def test_the_prompt_placeholder_a_server_counts_is_the_familys():
    """The rollout server counts a request's media against the token its prompt TEXT carries: Gemma 3 writes
    <start_of_image> (boi_token_index) per image, the others the token the processor expands."""
    from types import SimpleNamespace

    from r1_mm.rollout.request_checks import PLACEHOLDER_FIELDS, placeholder_fields

    assert placeholder_fields(SimpleNamespace(model_type="gemma3")) == {"image": ("boi_token_index",)}
    assert placeholder_fields(SimpleNamespace(model_type="qwen2_5_vl")) == PLACEHOLDER_FIELDS
    assert placeholder_fields(SimpleNamespace(model_type="not_a_family")) == PLACEHOLDER_FIELDS
