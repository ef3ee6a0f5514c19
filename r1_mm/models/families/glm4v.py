"""GLM-4.1V (transformers' ``glm4v``; GLM-4.5V's ``glm4v_moe`` shares its vision side): a GLM-4 decoder
(partial rotary M-RoPE, sandwich norms) over a ViT of 14-px patches merged 2x2; every video frame is one
image-like span ``<|begin_of_image|>`` + features + ``<|end_of_image|>`` followed by its second as text,
all inside ``<|begin_of_video|>`` ... ``<|end_of_video|>``.

Why its own media tokens: Glm4vProcessor expands ``<|image|>`` (images) and ``<|video|>`` (one per video)
and marks video features by the begin/end-of-video tokens around them (the frames' features sit on
``<|image|>`` tokens too), so the tokenizer carries all six.

Why ``do_sample_frames`` rides in the frames' metadata for vLLM: vLLM's GLM-4.1V processor reads it from
each video's metadata (default: sample again at the processor's 2 fps), not from the request's processor
kwargs, so r1-mm's decoded frames would be re-sampled and the prompt's frame timestamps would change
(``rollout/vllm_common.video_metadata``).
"""

from __future__ import annotations

from typing import Any

from r1_mm.models.families import glm_placeholders
from r1_mm.models.families.base import DEFAULT_VLLM_PROCESSOR_KWARGS, TESTED, ModelFamily, required_text_flag
from r1_mm.models.families.tiny_parts import TURNS_HEAD, TURNS_TAIL, text_sizes

IMAGE_SPAN = ("<|begin_of_image|>", "<|image|>", "<|end_of_image|>")
VIDEO_SPAN = ("<|begin_of_video|>", "<|video|>", "<|end_of_video|>")
MEDIA_TOKENS = IMAGE_SPAN + VIDEO_SPAN
# The same turns as Qwen (the tiny models share one tokenizer); media as GLM-4.1V's hub template renders them.
CHAT_TEMPLATE = (
    TURNS_HEAD + (
    "{%- if part['type'] == 'video' or 'video' in part -%}{{ '" + "".join(VIDEO_SPAN) + "' }}"
    "{%- elif part['type'] == 'image' or 'image' in part or 'image_url' in part -%}{{ '" + "".join(IMAGE_SPAN) + "' }}"
    "{%- elif 'text' in part -%}{{ part['text'] }}"
    ) + TURNS_TAIL
)
PATCH = 14
VISION_IMAGE_SIZE = 112  # the ViT's learned position grid (8 x 8), interpolated to each image's patch grid
PARTIAL_ROTARY = 0.5  # as released: rotary on half of each head; the M-RoPE sections split that half 8:12:12


def mrope_section(head_dim: int) -> list[int]:
    """Temporal / height / width frequencies of the rotary half, in the released proportion (8, 12, 12)."""
    half = int(head_dim * PARTIAL_ROTARY) // 2
    height = width = half * 12 // 32
    return [half - height - width, height, width]


def ids(tokenizer: Any) -> dict[str, int]:
    """The media token ids Glm4vConfig names."""
    names = ("image_start_token_id", "image_token_id", "image_end_token_id",
             "video_start_token_id", "video_token_id", "video_end_token_id")
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in zip(names, MEDIA_TOKENS, strict=True)}


# transformers always gives GLM-4.1V's q/k/v projections a bias; vLLM builds them with one only when
# attention_bias is true, and otherwise drops the synced biases: up to 0.56 nats per token between sampler and
# learner on the tiny model once training moved them
check_config = required_text_flag("attention_bias", "adds the q/k/v biases", "loads them")


def text_rope(spec: Any) -> dict[str, Any]:
    """The released partial M-RoPE (GLM-4.5V's decoder has the same)."""
    head_dim = spec.hidden_size // spec.num_heads
    return {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": PARTIAL_ROTARY,
            "mrope_section": mrope_section(head_dim)}


def vision_sizes(spec: Any) -> dict[str, Any]:
    """The tiny ViT (GLM-4.1V's and GLM-4.5V's vision configs take the same fields)."""
    return dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden_size, num_heads=spec.vision_heads,
                intermediate_size=spec.intermediate_size, out_hidden_size=spec.hidden_size, patch_size=PATCH,
                image_size=VISION_IMAGE_SIZE, spatial_merge_size=2, temporal_patch_size=2)


def glm4v_processor(spec: Any, tokenizer: Any) -> Any:
    """Glm4vProcessor (GLM-4.5V's too) over the tiny tokenizer.

    Glm4v's smart_resize counts an image as two frames and a video's pixels over all its frames; r1-mm's
    media.py sizes both and the processors run with do_resize=False, so these budgets only bound what vLLM
    profiles."""
    from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    image = Glm4vImageProcessor(size={"shortest_edge": spec.min_pixels, "longest_edge": 2 * spec.max_pixels},
                                patch_size=PATCH, temporal_patch_size=2, merge_size=2)
    video = Glm4vVideoProcessor(size={"shortest_edge": spec.min_pixels, "longest_edge": 16 * spec.max_pixels},
                                patch_size=PATCH, temporal_patch_size=2, merge_size=2, do_sample_frames=False)
    return Glm4vProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                          chat_template=CHAT_TEMPLATE)


def build_tiny(spec: Any, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import Glm4vConfig

    # attention_bias: what the released config.json carries and vLLM reads (see check_config)
    text = text_sizes(spec, tokenizer) | {"attention_bias": True, "rope_parameters": text_rope(spec)}
    config = Glm4vConfig(text_config=text, vision_config=vision_sizes(spec), tie_word_embeddings=False,
                         **ids(tokenizer))
    return config, glm4v_processor(spec, tokenizer)


FAMILY = ModelFamily(
    model_type="glm4v", display_name="GLM-4.1V", build_tiny=build_tiny, chat_template=CHAT_TEMPLATE,
    media_tokens=MEDIA_TOKENS, check_config=check_config,
    # image and video rows in one learner forward (families/glm_placeholders)
    prepare=glm_placeholders.install,
    # frames arrive decoded at r1-mm's fps: vLLM must neither resize nor re-sample them (see the module's doc)
    vllm_processor_kwargs=dict(DEFAULT_VLLM_PROCESSOR_KWARGS) | {"do_sample_frames": False},
    note="The MLP's gate and up projections are one fused gate_up_proj (in model.lora_target_modules' default). "
         "GLM-4.5V (glm4v_moe, the same vision side with a MoE decoder): families/glm4v_moe.py.",
    support={
        "grouped": TESTED, "hf": TESTED, "video": TESTED, "vllm_colocate": TESTED, "weight_sync": TESTED,
        "vllm_pool": TESTED, "lora": TESTED,
    })
