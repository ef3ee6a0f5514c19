"""Qwen3.5-MoE (Qwen3.5-35B-A3B, -397B-A17B): Qwen3.5's vision tower and hybrid decoder (Gated DeltaNet
linear attention + gated full attention) with a sparse mixture-of-experts MLP beside a gated shared expert.

Why nothing of its own beyond the tiny model: the grouped forward's linear-attention states
(``forward/packed_linear_attention``) are Qwen3.5's; the router and experts act per token, so the packed
layout never reaches them; the weight sync sends the experts through transformers' own reverse conversion
(the checkpoint stores one gate/up/down projection per expert; transformers fuses them in memory), which
is what vLLM's loader reads (``models/weights.checkpoint_conversions``).
"""

from __future__ import annotations

from typing import Any

from r1_mm.models.families.base import TESTED, ModelFamily
from r1_mm.models.families.qwen3_5 import hybrid_text, vision_sizes
from r1_mm.models.families.qwen3_vl import qwen3_vl_processor
from r1_mm.models.families.tiny_parts import QWEN_VL_CHAT_TEMPLATE, qwen_vision_ids


def check_config(config: Any) -> str | None:
    """transformers always renormalises the chosen experts' router weights; vLLM does unless the config says
    ``norm_topk_prob: false``."""
    if getattr(config.get_text_config(), "norm_topk_prob", True) is False:
        return ("text_config.norm_topk_prob is false: vLLM would then skip renormalising the top-k router weights, "
                "which transformers always renormalises")
    return None


def build_tiny(spec: Any, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import Qwen3_5MoeConfig

    text = hybrid_text(spec, tokenizer) | {
        # non-square experts (their width is not the hidden size): a transposed expert fails to load, never
        # loads silently
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": spec.intermediate_size * 3 // 4,
        "shared_expert_intermediate_size": spec.intermediate_size // 2}
    text.pop("intermediate_size")
    config = Qwen3_5MoeConfig(text_config=text, vision_config=vision_sizes(spec), tie_word_embeddings=False,
                              **qwen_vision_ids(tokenizer))
    return config, qwen3_vl_processor(spec, tokenizer)


FAMILY = ModelFamily(
    model_type="qwen3_5_moe", display_name="Qwen3.5-MoE", build_tiny=build_tiny,
    chat_template=QWEN_VL_CHAT_TEMPLATE, check_config=check_config,
    support=dict.fromkeys(("grouped", "hf", "vllm_colocate", "vllm_pool", "weight_sync", "video", "lora"), TESTED))
