"""Qwen3-VL-MoE (Qwen3-VL-30B-A3B, -235B-A22B): Qwen3-VL's vision tower, M-RoPE and DeepStack with a
sparse mixture-of-experts decoder.

Why it needs nothing of its own beyond the tiny model: the grouped forward only changes how tokens are
laid out and attended, which the router and the experts never see (they act per token); the weight
sync sends the fused experts in the checkpoint's (experts, in, out) layout through transformers' own
reverse conversion with its transposes made unconditional (models/weights.checkpoint_conversions), which is
what vLLM's loader reads.
"""

from __future__ import annotations

from typing import Any

from r1_mm.models.families.base import TESTED, ModelFamily, required_text_flag
from r1_mm.models.families.qwen3_vl import tiny_parts
from r1_mm.models.families.tiny_parts import QWEN_VL_CHAT_TEMPLATE

# transformers always renormalises the chosen experts' router weights; vLLM does only when norm_topk_prob is
# true (and fails without it)
check_config = required_text_flag("norm_topk_prob", "renormalises the top-k router weights", "does so")


def build_tiny(spec: Any, tokenizer: Any) -> tuple[Any, Any]:
    return tiny_parts(spec, tokenizer, moe=True)


FAMILY = ModelFamily(
    model_type="qwen3_vl_moe", display_name="Qwen3-VL-MoE", build_tiny=build_tiny,
    chat_template=QWEN_VL_CHAT_TEMPLATE, check_config=check_config,
    support=dict.fromkeys(("grouped", "hf", "vllm_colocate", "vllm_pool", "weight_sync", "video", "lora"), TESTED))
