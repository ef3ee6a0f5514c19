"""Qwen2.5-VL: Qwen2-VL with window attention in the ViT and absolute-time M-RoPE for video."""

from __future__ import annotations

from typing import Any

from r1_mm.models.families.base import TESTED, ModelFamily
from r1_mm.models.families.tiny_parts import (
    QWEN_VL_CHAT_TEMPLATE,
    mrope_section,
    qwen2_vl_processors,
    qwen_vision_ids,
    text_sizes,
)


def build_tiny(spec: Any, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor

    text = text_sizes(spec, tokenizer) | {"rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section(spec.hidden_size // spec.num_heads)}}
    vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden_size,
                  intermediate_size=spec.vision_hidden_size * 2, num_heads=spec.vision_heads,
                  out_hidden_size=spec.hidden_size, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[spec.vision_depth - 1],
                  tokens_per_second=2)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                              **qwen_vision_ids(tokenizer))
    image, video = qwen2_vl_processors(spec)
    processor = Qwen2_5_VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                    chat_template=QWEN_VL_CHAT_TEMPLATE)
    return config, processor


FAMILY = ModelFamily(
    model_type="qwen2_5_vl", display_name="Qwen2.5-VL", build_tiny=build_tiny, chat_template=QWEN_VL_CHAT_TEMPLATE,
    support=dict.fromkeys(("grouped", "hf", "vllm_colocate", "vllm_pool", "weight_sync", "video", "lora"), TESTED))
