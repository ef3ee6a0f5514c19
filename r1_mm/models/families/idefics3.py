"""Idefics3 (transformers' ``idefics3``): SmolVLM's model and image processing (transformers derives SmolVLM
from it), images only. An image is resized to the processor's ``size``, split into tiles of
``max_image_size`` plus a global tile, each tile written as ``<fake_token_around_image><row_i_col_j>`` +
``<image>`` x ``image_seq_len`` (``families/smolvlm.py`` explains the tiles, the sizes and why vLLM runs the
saved processor with no kwargs; the tiny model shares them).

What differs from SmolVLM: Idefics3Processor names its media tokens itself (``<global-img>`` and the row/column
tokens it reads from the vocabulary, ``<fake_token_around_image>``, ``<image>`` and ``<end_of_utterance>`` it
adds as special tokens), and it has no video processor.

Why video is refused: Idefics3 takes no video (transformers' processor has no video input, vLLM's model no
video modality), so video rows stop at the input check whatever the engine.
"""

from __future__ import annotations

from typing import Any

from r1_mm.models.families import smolvlm
from r1_mm.models.families.base import TESTED, ModelFamily

# the tokens Idefics3Processor writes around and between tiles (no video token: it takes no video)
MEDIA_TOKENS = ("<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>") + smolvlm.ROW_COL_TOKENS
CHAT_TEMPLATE = smolvlm.chat_template(video=False)


def build_tiny(spec: Any, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    config = smolvlm.tiny_config(Idefics3Config, spec, tokenizer)
    image = Idefics3ImageProcessor(**smolvlm.PROCESSOR_SIZES, do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image, tokenizer=tokenizer, image_seq_len=smolvlm.image_seq_len(),
                                  chat_template=CHAT_TEMPLATE)
    return config, processor


FAMILY = ModelFamily(
    model_type="idefics3", display_name="Idefics3", build_tiny=build_tiny, chat_template=CHAT_TEMPLATE,
    media_tokens=MEDIA_TOKENS,
    vllm_processor_kwargs={},  # as SmolVLM: vLLM runs the saved processor as the learner does
    support={
        "grouped": TESTED, "hf": TESTED, "vllm_colocate": TESTED, "vllm_pool": TESTED, "weight_sync": TESTED,
        "lora": TESTED,
        "video": "Idefics3 takes no video (transformers' Idefics3Processor has no video input, vLLM's model no "
                 "video modality)",
    })
