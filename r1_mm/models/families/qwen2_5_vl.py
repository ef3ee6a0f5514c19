"""Qwen2.5-VL: Qwen2-VL with window attention in the ViT and absolute-time M-RoPE for video."""

from __future__ import annotations

from typing import Any

from r1_mm.models.families import rope_index
from r1_mm.models.families.base import TESTED, ModelFamily
from r1_mm.models.families.tiny_parts import QWEN_VL_CHAT_TEMPLATE, qwen2_vl_style_parts


def build_tiny(spec: Any, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor

    vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden_size,
                  intermediate_size=spec.vision_hidden_size * 2, num_heads=spec.vision_heads,
                  out_hidden_size=spec.hidden_size, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[spec.vision_depth - 1],
                  tokens_per_second=2)
    return qwen2_vl_style_parts(spec, tokenizer, Qwen2_5_VLConfig, Qwen2_5_VLProcessor, vision)


FAMILY = ModelFamily(
    model_type="qwen2_5_vl", tools=TESTED,  # tests/test_tool_turns.py, tests/test_agentic_rollout.py
    display_name="Qwen2.5-VL", build_tiny=build_tiny, chat_template=QWEN_VL_CHAT_TEMPLATE,
    prepare=rope_index.install,
    lora_vision_targets=("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "merger.mlp.0",
                         "merger.mlp.2"),
    support=dict.fromkeys(("grouped", "hf", "vllm_colocate", "vllm_pool", "weight_sync", "video", "lora"), TESTED))
