"""Qwen2-VL: M-RoPE decoder (Qwen2) with a ViT of 14-px patches merged 2x2."""

from __future__ import annotations

from typing import Any

from r1_mm.models.families import rope_index
from r1_mm.models.families.base import TESTED, ModelFamily
from r1_mm.models.families.tiny_parts import QWEN_VL_CHAT_TEMPLATE, qwen2_vl_style_parts


def build_tiny(spec: Any, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLProcessor

    vision = dict(depth=spec.vision_depth, embed_dim=spec.vision_hidden_size, hidden_size=spec.hidden_size,
                  num_heads=spec.vision_heads, mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return qwen2_vl_style_parts(spec, tokenizer, Qwen2VLConfig, Qwen2VLProcessor, vision)


FAMILY = ModelFamily(
    model_type="qwen2_vl", display_name="Qwen2-VL", build_tiny=build_tiny, chat_template=QWEN_VL_CHAT_TEMPLATE,
    prepare=rope_index.install,
    lora_vision_targets=("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "merger.mlp.0", "merger.mlp.2"),
    support=dict.fromkeys(("grouped", "hf", "vllm_colocate", "vllm_pool", "weight_sync", "video", "lora"), TESTED))
