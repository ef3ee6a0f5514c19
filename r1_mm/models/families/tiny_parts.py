"""Pieces the families' tiny models share: the Qwen-style special tokens and chat turns, and the
decoder sizes taken from a :class:`~r1_mm.models.tiny.TinySpec`.

Why shared: every tiny model is trained on the same synthetic tasks, so their tokenizers carry the same
tags and chat scaffolding; only how media placeholders render and which config classes hold the
sizes differ per family (its own module).
"""

from __future__ import annotations

from typing import Any

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]

# Turn scaffolding shared by the families' templates: a default system turn, role headers,
# string or part-list content, and the generation prompt. Each family fills in how parts render.
# Tools as Qwen's hub templates (Qwen2.5, Qwen3-VL) render them: their schemas in the system turn, and each
# tool message inside <tool_response> in a user turn (consecutive tool messages share one turn); a tool
# message's parts (its images) render as the family renders any part. Without tools and tool messages the
# rendering is exactly the earlier one.
TOOLS_SYSTEM = (
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' and messages[0]['content'] is string -%}{{ messages[0]['content'] }}"
    "{%- else -%}{{ 'You are a helpful assistant.' }}{%- endif -%}"
    "{{ '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools -%}{{ '\\n' }}{{ tool | tojson }}{%- endfor -%}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif -%}"
)
TURNS_HEAD = (
    TOOLS_SYSTEM +
    "{%- for message in messages -%}"
    "{%- if not (tools and loop.first and message['role'] == 'system') -%}"
    "{%- if loop.first and message['role'] != 'system' and not tools -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\\n<tool_response>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + message['role'] + '\\n' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
)
TURNS_TAIL = (
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'tool' -%}{{ '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- else -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# The Qwen2-VL chat format (the same rendering as the family's hub template), written for r1-mm:
# a default system turn, media placeholders wrapped in vision start/end, and the generation prompt.
QWEN_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}{%- set video_count = namespace(value=0) -%}"
    + TURNS_HEAD + (
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Picture ' + image_count.value|string + ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Video ' + video_count.value|string + ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part -%}{{ part['text'] }}"
    ) + TURNS_TAIL
)


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}


def mrope_section(head_dim: int) -> list[int]:
    """M-RoPE's split of the rotary half into temporal / height / width sections."""
    half = head_dim // 2
    return [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]


def text_sizes(spec: Any, tokenizer: Any) -> dict[str, Any]:
    """The decoder's config fields every family shares (vocabulary, widths, depth, special ids)."""
    ids = special_token_ids(tokenizer)
    head_dim = spec.hidden_size // spec.num_heads
    if head_dim < 32:
        raise ValueError(f"head_dim {head_dim} < 32: vLLM's CPU attention rejects it")
    vocab = (len(tokenizer) + 63) // 64 * 64
    if spec.model_vocab_size is not None:
        if spec.model_vocab_size < len(tokenizer):
            raise ValueError(f"model_vocab_size {spec.model_vocab_size} is below the tokenizer's {len(tokenizer)} tokens")
        vocab = spec.model_vocab_size
    return dict(
        vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=8192, rms_norm_eps=1e-6,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )


def qwen_vision_ids(tokenizer: Any) -> dict[str, int]:
    """The media token ids Qwen-style configs name."""
    ids = special_token_ids(tokenizer)
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def qwen2_vl_processors(spec: Any, patch_size: int = 14) -> tuple[Any, Any]:
    """Qwen2-VL-style image and video processors within the tiny spec's pixel budget; the video
    processor takes the frames r1-mm decoded as they are (no re-sampling)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    image = Qwen2VLImageProcessor(size=size, patch_size=patch_size, temporal_patch_size=2, merge_size=2)
    video = Qwen2VLVideoProcessor(size=size, patch_size=patch_size, temporal_patch_size=2, merge_size=2,
                                  do_sample_frames=False, cap_pixels_per_frame=True)
    return image, video


def qwen2_vl_style_parts(spec: Any, tokenizer: Any, config_class: type, processor_class: type,
                         vision: dict[str, Any]) -> tuple[Any, Any]:
    """Config and processor of a Qwen2-VL-style tiny model (M-RoPE decoder, Qwen2-VL processors); the
    family gives its config and processor classes and its vision tower's sizes."""
    text = text_sizes(spec, tokenizer) | {"rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section(spec.hidden_size // spec.num_heads)}}
    config = config_class(text_config=text, vision_config=vision, tie_word_embeddings=False, **qwen_vision_ids(tokenizer))
    image, video = qwen2_vl_processors(spec)
    processor = processor_class(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                chat_template=QWEN_VL_CHAT_TEMPLATE)
    return config, processor
