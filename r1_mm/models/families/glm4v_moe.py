"""GLM-4.5V (transformers' ``glm4v_moe``): GLM-4.1V's vision tower, processor, video layout and chat
template (``families/glm4v``) with a mixture-of-experts GLM-4.5 decoder: sigmoid router with a score
correction bias (used to choose experts, not to weight them), group-limited top-k, top-k weights
renormalised and scaled by ``routed_scaling_factor``, one always-on shared expert, the first
``first_k_dense_replace`` layers dense.

Why nothing of its own beyond the tiny model and the config check: the router and the experts act per token,
so the grouped forward's packed layout never reaches them; the decoder's attention is GLM's partial M-RoPE
with q/k/v biases that both transformers and vLLM build from ``attention_bias``; the weight sync sends the
experts through transformers' own reverse conversion (``models/weights.checkpoint_conversions``: the
checkpoint stores one gate/up/down projection per expert, transformers fuses them in memory), which is
what vLLM's loader reads. The tiny model's experts are non-square (their width is not the hidden size), so
an expert sent transposed fails to load instead of loading silently, and its ``routed_scaling_factor`` is
not 1, so a side that skipped it would differ; the file-only score-correction bias (a buffer: never synced,
never trained) is read by both, measured with a bias that changes the routing (tests/test_family_glm4v_moe).
Group-limited top-k with more than one group (the released model and the tiny one use ``n_group`` 1) is the
same computation in vLLM's CPU router by reading (top-2 sums of the biased scores per group), not measured.
"""

from __future__ import annotations

from typing import Any

from r1_mm.models.families import glm_placeholders
from r1_mm.models.families.base import DEFAULT_VLLM_PROCESSOR_KWARGS, TESTED, ModelFamily
from r1_mm.models.families.glm4v import (
    CHAT_TEMPLATE,
    MEDIA_TOKENS,
    glm4v_processor,
    ids,
    text_rope,
    vision_sizes,
)
from r1_mm.models.families.tiny_parts import text_sizes


def check_config(config: Any) -> str | None:
    """vLLM's GLM-4.5 decoder reads ``use_qk_norm`` (q/k RMSNorm before the rotary embedding), which
    transformers' GLM-4.5V neither declares nor has: with it true vLLM adds norms the learner never applies
    (and has no weights for); without it vLLM cannot build the decoder."""
    if getattr(config.get_text_config(), "use_qk_norm", None) is not False:
        return ("text_config.use_qk_norm must be false (transformers' GLM-4.5V has no q/k norm; vLLM reads this flag "
                "and adds one when it is set): add \"use_qk_norm\": false to text_config in config.json")
    return None


def build_tiny(spec: Any, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import Glm4vMoeConfig

    text = text_sizes(spec, tokenizer) | {
        "attention_bias": True, "rope_parameters": text_rope(spec), "use_qk_norm": False,
        "head_dim": spec.hidden_size // spec.num_heads,
        # layer 0 dense, the others sparse; experts non-square (width 3/4 of the dense MLP's, not the hidden size)
        "first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
        "moe_intermediate_size": spec.intermediate_size * 3 // 4, "n_group": 1, "topk_group": 1,
        "norm_topk_prob": True, "routed_scaling_factor": 2.5}
    config = Glm4vMoeConfig(text_config=text, vision_config=vision_sizes(spec), tie_word_embeddings=False,
                            **ids(tokenizer))
    return config, glm4v_processor(spec, tokenizer)


FAMILY = ModelFamily(
    model_type="glm4v_moe", display_name="GLM-4.5V", build_tiny=build_tiny, chat_template=CHAT_TEMPLATE,
    media_tokens=MEDIA_TOKENS, check_config=check_config,
    # image and video rows in one learner forward (families/glm_placeholders)
    prepare=glm_placeholders.install,
    # frames arrive decoded at r1-mm's fps: vLLM must neither resize nor re-sample them (families/glm4v)
    vllm_processor_kwargs=dict(DEFAULT_VLLM_PROCESSOR_KWARGS) | {"do_sample_frames": False},
    note="LoRA adapts the attention, the dense layers' MLP and the shared experts (nn.Linear); the routed experts "
         "are fused parameters and stay frozen under LoRA.",
    support=dict.fromkeys(("grouped", "hf", "vllm_colocate", "vllm_pool", "weight_sync", "video", "lora"), TESTED))
