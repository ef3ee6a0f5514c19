"""Qwen3-VL: a Qwen3 decoder with interleaved M-RoPE, DeepStack (vision features of several ViT layers
added to the first decoder layers' hidden states) and video frames separated by text timestamps
(``<1.5 seconds>``) instead of temporal position ids; a ViT of 16-px patches merged 2x2."""

from __future__ import annotations

from typing import Any

from r1_mm.models.families.base import TESTED, ModelFamily
from r1_mm.models.families.tiny_parts import (
    QWEN_VL_CHAT_TEMPLATE,
    qwen2_vl_processors,
    qwen_vision_ids,
    text_sizes,
)

PATCH = 16


def interleaved_mrope_section(head_dim: int) -> list[int]:
    """Temporal / height / width frequencies, in the released checkpoints' proportion (24, 20, 20 of 64)."""
    half = head_dim // 2
    height = width = half * 20 // 64
    return [half - height - width, height, width]


def tiny_parts(spec: Any, tokenizer: Any, *, moe: bool = False) -> tuple[Any, Any]:
    """Config and processor of a tiny Qwen3-VL (``moe``: Qwen3-VL-MoE's sparse decoder)."""
    head_dim = spec.hidden_size // spec.num_heads
    text = text_sizes(spec, tokenizer) | {"head_dim": head_dim, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": interleaved_mrope_section(head_dim),
        "mrope_interleaved": True}}
    # DeepStack: the features of every ViT layer listed here are added to decoder layers 0, 1, ...
    deepstack = list(range(min(spec.vision_depth, spec.num_layers)))
    vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden_size,
                  intermediate_size=spec.vision_hidden_size * 2, num_heads=spec.vision_heads,
                  out_hidden_size=spec.hidden_size, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=256, deepstack_visual_indexes=deepstack)
    if moe:
        from transformers import Qwen3VLMoeConfig as Config

        text |= {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": spec.intermediate_size * 3 // 4,
                 "decoder_sparse_step": 1,
                 # what the released checkpoints' config.json carries and vLLM reads (qwen3_vl_moe.check_config)
                 "norm_topk_prob": True}
    else:
        from transformers import Qwen3VLConfig as Config
    config = Config(text_config=text, vision_config=vision, tie_word_embeddings=False, **qwen_vision_ids(tokenizer))
    return config, qwen3_vl_processor(spec, tokenizer)


def qwen3_vl_processor(spec: Any, tokenizer: Any) -> Any:
    """Qwen3-VL's processor within the tiny spec's pixel budget (Qwen3.5 uses the same one)."""
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    image, _ = qwen2_vl_processors(spec, patch_size=PATCH)
    # the released checkpoints normalise images and video frames alike (mean = std = 0.5); vLLM's on-device
    # normalisation applies the image processor's values to video frames too
    image.image_mean, image.image_std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    video = Qwen3VLVideoProcessor(size=size, patch_size=PATCH, temporal_patch_size=2, merge_size=2,
                                  do_sample_frames=False, cap_pixels_per_frame=True)
    return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                            chat_template=QWEN_VL_CHAT_TEMPLATE)


def build_tiny(spec: Any, tokenizer: Any) -> tuple[Any, Any]:
    return tiny_parts(spec, tokenizer)


FAMILY = ModelFamily(
    model_type="qwen3_vl", tools=TESTED,  # tests/test_tool_turns.py, tests/test_agentic_rollout.py
    display_name="Qwen3-VL", build_tiny=build_tiny, chat_template=QWEN_VL_CHAT_TEMPLATE,
    # blocks, merger and the deepstack mergers (deepstack_merger_list.N.linear_fc1/2)
    lora_vision_targets=("attn.qkv", "attn.proj", "linear_fc1", "linear_fc2"),
    support={
        "grouped": TESTED, "hf": TESTED, "vllm_colocate": TESTED, "vllm_pool": TESTED, "weight_sync": TESTED,
        "video": TESTED,
        "lora": TESTED,
    })
