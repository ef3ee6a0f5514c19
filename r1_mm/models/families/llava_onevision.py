"""LLaVA-OneVision: SigLIP tiles (anyres) projected into a Qwen2 decoder; 1-D positions."""

from __future__ import annotations

from typing import Any

from r1_mm.models.families.base import TESTED, ModelFamily
from r1_mm.models.families.tiny_parts import TURNS_HEAD, TURNS_TAIL, text_sizes

# The same turns as Qwen, media as "<image>\n" / "<video>\n".
CHAT_TEMPLATE = (
    TURNS_HEAD + (
    "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<video>\\n' }}"
    "{%- elif 'text' in part -%}{{ part['text'] }}"
    ) + TURNS_TAIL
)
MEDIA_TOKENS = ("<image>", "<video>")
TILE = 56  # SigLIP input side: 4x4 patches of 14 px -> 16 tokens per tile
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def build_tiny(spec: Any, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    text = text_sizes(spec, tokenizer) | {"model_type": "qwen2"}
    vision = {"model_type": "siglip_vision_model", "hidden_size": spec.vision_hidden_size,
              "intermediate_size": spec.vision_hidden_size * 2, "num_hidden_layers": spec.vision_depth,
              "num_attention_heads": spec.vision_heads, "image_size": TILE, "patch_size": 14}
    config = LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_grid_pinpoints=PINPOINTS,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False)
    tile = {"height": TILE, "width": TILE}
    image = LlavaOnevisionImageProcessor(size=tile, crop_size=tile, image_grid_pinpoints=PINPOINTS)
    video = LlavaOnevisionVideoProcessor(size=tile, crop_size=tile)
    processor = LlavaOnevisionProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                        num_image_tokens=(TILE // 14) ** 2, vision_feature_select_strategy="full",
                                        chat_template=CHAT_TEMPLATE)
    return config, processor


FAMILY = ModelFamily(
    model_type="llava_onevision", display_name="LLaVA-OneVision", build_tiny=build_tiny, chat_template=CHAT_TEMPLATE,
    media_tokens=MEDIA_TOKENS,
    # the learner's processor resizes images and frames to its tiles (media.py does not: no patch x merge
    # factor), so vLLM's must too; do_resize=False sent 112 px frames to a 56 px SigLIP
    vllm_processor_kwargs={},
    support=dict.fromkeys(("grouped", "hf", "vllm_colocate", "vllm_pool", "weight_sync", "video", "lora"), TESTED))
