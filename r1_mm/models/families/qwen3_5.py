"""Qwen3.5 (dense): Qwen3-VL's vision tower and processor (16-px patches merged 2x2, frames separated by text
timestamps, interleaved M-RoPE on a quarter of each head) over a hybrid decoder: three Gated DeltaNet
(linear-attention) layers to every gated full-attention layer.

Why its own grouped-forward path: a linear-attention layer carries a convolution state and a recurrent
state along the sequence, so in a packed row ``[p | c1 | c2 ..]`` a completion must continue from its
prompt's states, never from the end of the previous completion (up to 1.16 nats per token otherwise).
``forward/packed_linear_attention`` runs each prompt once, keeps its final states and starts every
completion of that prompt from them.
"""

from __future__ import annotations

from typing import Any

from r1_mm.models.families.base import TESTED, ModelFamily
from r1_mm.models.families.qwen3_vl import PATCH, qwen3_vl_processor
from r1_mm.models.families.tiny_parts import QWEN_VL_CHAT_TEMPLATE, qwen_vision_ids, text_sizes

PARTIAL_ROTARY = 0.25  # as released: rotary on a quarter of each full-attention head
FULL_ATTENTION_INTERVAL = 2  # released: 4 (three linear layers per full one); the tiny model has 2 layers


def mrope_section(head_dim: int) -> list[int]:
    """Temporal / height / width frequencies of the rotary part, in the released proportion (11, 11, 10)."""
    half = int(head_dim * PARTIAL_ROTARY) // 2
    height = width = half * 10 // 32
    return [half - height - width, height, width]


def hybrid_text(spec: Any, tokenizer: Any) -> dict[str, Any]:
    """The decoder's config: full-attention layers every ``FULL_ATTENTION_INTERVAL`` layers; linear-attention
    heads of 64 (vLLM's CPU kernel takes 64 or 128, not 32), two key heads shared by four value heads (the
    released 2:1 grouping)."""
    head_dim = spec.hidden_size // spec.num_heads
    layers = [
        "full_attention" if (i + 1) % FULL_ATTENTION_INTERVAL == 0 else "linear_attention"
        for i in range(spec.num_layers)]
    return text_sizes(spec, tokenizer) | {
        "head_dim": head_dim, "layer_types": layers, "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 64, "linear_value_head_dim": 64, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": PARTIAL_ROTARY,
                            "mrope_section": mrope_section(head_dim), "mrope_interleaved": True}}


def vision_sizes(spec: Any) -> dict[str, Any]:
    return dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden_size,
                intermediate_size=spec.vision_hidden_size * 2, num_heads=spec.vision_heads,
                out_hidden_size=spec.hidden_size, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2,
                num_position_embeddings=256)


def build_tiny(spec: Any, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import Qwen3_5Config

    config = Qwen3_5Config(text_config=hybrid_text(spec, tokenizer), vision_config=vision_sizes(spec),
                           tie_word_embeddings=False, **qwen_vision_ids(tokenizer))
    return config, qwen3_vl_processor(spec, tokenizer)


FAMILY = ModelFamily(
    model_type="qwen3_5", display_name="Qwen3.5", build_tiny=build_tiny, chat_template=QWEN_VL_CHAT_TEMPLATE,
    support={
        "grouped": TESTED,
        "hf": TESTED,
        "vllm_colocate": TESTED,
        "vllm_pool": TESTED,
        "weight_sync": TESTED,
        "video": TESTED,
        "lora": TESTED,
    })
