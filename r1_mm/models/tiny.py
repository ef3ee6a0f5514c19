"""Tiny random-weight vision-language models built offline, saved like hub checkpoints.

Why: tests, benchmarks and the demo must run with no model hub. Each model gets a locally trained
byte-level BPE tokenizer carrying its family's special tokens and chat format, a real processor
(image + video) and ``save_pretrained`` output that loads back through ``AutoModelForImageTextToText``
and ``AutoProcessor`` exactly like a downloaded model. Building is deterministic from a seed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# family -> the model it stands for (what `r1-mm make-tiny --help` names)
FAMILY_NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "llava_onevision": "LLaVA-OneVision"}
FAMILIES = tuple(FAMILY_NAMES)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
# Reasoning/answer tags are single tokens so that an RL demo can reach the answer format.
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# Turn scaffolding shared by both families' templates: a default system turn, role headers,
# string or part-list content, and the generation prompt. Each family fills in how parts render.
_TURNS_HEAD = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
)
_TURNS_TAIL = (
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# The Qwen2-VL chat format (the same rendering as the family's hub template), written for r1-mm:
# a default system turn, media placeholders wrapped in vision start/end, and the generation prompt.
QWEN_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}{%- set video_count = namespace(value=0) -%}"
    + _TURNS_HEAD + (
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Picture ' + image_count.value|string + ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Video ' + video_count.value|string + ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part -%}{{ part['text'] }}"
    ) + _TURNS_TAIL
)


# LLaVA-OneVision (Qwen2 language model): the same turns, media as "<image>\n" / "<video>\n".
LLAVA_OV_CHAT_TEMPLATE = (
    _TURNS_HEAD + (
    "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<video>\\n' }}"
    "{%- elif 'text' in part -%}{{ part['text'] }}"
    ) + _TURNS_TAIL
)
LLAVA_MEDIA_TOKENS = ("<image>", "<video>")


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny model. head_dim = hidden_size / num_heads must be >= 32 for vLLM's CPU attention."""

    family: str = "qwen2_5_vl"
    small_vocab: bool = False
    seed: int = 0
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 128
    vision_hidden_size: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    min_pixels: int = 28 * 28
    max_pixels: int = 28 * 28 * 256
    # embedding / LM-head rows when they should exceed the tokenizer's (Qwen2.5-VL checkpoints carry 151,936):
    # benchmarks at the vocabulary users run; None = the tokenizer's size rounded up to 64
    model_vocab_size: int | None = None

    @property
    def vocab_size(self) -> int:
        return 96 if self.small_vocab else 1024

    def key(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if not (k == "model_vocab_size" and v is None)}  # keys of older specs stay
        blob = json.dumps(fields, sort_keys=True) + _BUILDER_VERSION
        return f"{self.family}{'-small' if self.small_vocab else ''}-s{self.seed}-{hashlib.sha1(blob.encode()).hexdigest()[:8]}"


_BUILDER_VERSION = "2"


def _training_corpus() -> list[str]:
    """Text the tokenizer is trained on: the synthetic tasks' words, tags and chat scaffolding."""
    colours = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple"]
    lines = [
        "How many squares are in the image?", "How many red squares are there?",
        "Which object is on the left, the circle or the square?", "Which object is nearer to the camera?",
        "When does the square appear in the video? Answer with start and end in seconds.",
        "Think step by step inside <think></think> tags, then give the final answer inside <answer></answer> tags.",
        "You are a helpful assistant.", "The answer is", "left right nearer farther circle square video image",
        "There are squares in the picture. I count them one by one.",
        "<think>I count the squares.</think><answer>3</answer>", "yes no A B C D",
    ]
    lines += [f"{c} square {c} circle" for c in colours]
    lines += [f"<answer>{i}</answer> [{i}.0, {i + 1}.5]" for i in range(10)]
    return lines * 4


def build_tokenizer(spec: TinySpec):
    """Train a byte-level BPE with digits split one per token, wrapped as a fast HF tokenizer."""
    llava = spec.family == "llava_onevision"
    extra_special_tokens = LLAVA_MEDIA_TOKENS if llava else ()
    specials = QWEN_SPECIAL_TOKENS[1:] + list(extra_special_tokens)
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - len(QWEN_SPECIAL_TOKENS) - len(TAG_TOKENS) - len(extra_special_tokens),
        min_frequency=2,
        # small vocab: only the corpus's own characters (digits are then ~1/8 of the vocabulary, which
        # makes answers reachable by a random policy); text outside that alphabet is dropped.
        initial_alphabet=[] if spec.small_vocab else pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=specials,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": specials})
    fast.add_tokens(TAG_TOKENS)  # ordinary (decoded) tokens, but never split
    fast.chat_template = LLAVA_OV_CHAT_TEMPLATE if llava else QWEN_VL_CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def _build_processor(spec: TinySpec, tokenizer):
    if spec.family == "llava_onevision":
        return _build_llava_processor(spec, tokenizer)
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=14, temporal_patch_size=2, merge_size=2)
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=14, temporal_patch_size=2, merge_size=2,
                                            do_sample_frames=False, cap_pixels_per_frame=True)
    if spec.family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as Proc
    else:
        from transformers import Qwen2VLProcessor as Proc
    return Proc(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                chat_template=QWEN_VL_CHAT_TEMPLATE)


_LLAVA_TILE = 56  # SigLIP input side: 4x4 patches of 14 px -> 16 tokens per tile
_LLAVA_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def _build_llava_processor(spec: TinySpec, tokenizer):
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tile = {"height": _LLAVA_TILE, "width": _LLAVA_TILE}
    image_processor = LlavaOnevisionImageProcessor(size=tile, crop_size=tile, image_grid_pinpoints=_LLAVA_PINPOINTS)
    video_processor = LlavaOnevisionVideoProcessor(size=tile, crop_size=tile)
    return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                                   num_image_tokens=(_LLAVA_TILE // 14) ** 2, vision_feature_select_strategy="full",
                                   chat_template=LLAVA_OV_CHAT_TEMPLATE)


def _build_llava_config(spec: TinySpec, tokenizer, text: dict):
    from transformers import LlavaOnevisionConfig

    text = {k: v for k, v in text.items() if k != "rope_parameters"} | {"model_type": "qwen2"}
    vision = {"model_type": "siglip_vision_model", "hidden_size": spec.vision_hidden_size,
              "intermediate_size": spec.vision_hidden_size * 2, "num_hidden_layers": spec.vision_depth,
              "num_attention_heads": spec.vision_heads, "image_size": _LLAVA_TILE, "patch_size": 14}
    return LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_grid_pinpoints=_LLAVA_PINPOINTS,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False)


def _build_config(spec: TinySpec, tokenizer):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = spec.hidden_size // spec.num_heads
    if head_dim < 32:
        raise ValueError(f"head_dim {head_dim} < 32: vLLM's CPU attention rejects it")
    half = head_dim // 2  # M-RoPE splits the rotary half into temporal/height/width sections
    mrope_section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    vocab = (len(tokenizer) + 63) // 64 * 64
    if spec.model_vocab_size is not None:
        if spec.model_vocab_size < len(tokenizer):
            raise ValueError(f"model_vocab_size {spec.model_vocab_size} is below the tokenizer's {len(tokenizer)} tokens")
        vocab = spec.model_vocab_size
    text = dict(
        vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=8192, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    if spec.family == "llava_onevision":
        return _build_llava_config(spec, tokenizer, text)
    common = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    if spec.family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden_size,
                      intermediate_size=spec.vision_hidden_size * 2, num_heads=spec.vision_heads,
                      out_hidden_size=spec.hidden_size, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112, fullatt_block_indexes=[spec.vision_depth - 1],
                      tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    if spec.family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = dict(depth=spec.vision_depth, embed_dim=spec.vision_hidden_size, hidden_size=spec.hidden_size,
                      num_heads=spec.vision_heads, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    raise ValueError(f"unknown tiny model family '{spec.family}'; known: {', '.join(FAMILIES)}")


def build_tiny_model(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Build a tiny model + processor and ``save_pretrained`` both into ``out_dir``."""
    import torch
    from transformers import AutoModelForImageTextToText

    spec = spec or TinySpec()
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown tiny model family '{spec.family}'; known: {', '.join(FAMILIES)}")
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(spec)
    processor = _build_processor(spec, tokenizer)
    config = _build_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.do_sample = False
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "r1_mm_tiny.json").write_text(json.dumps(asdict(spec), indent=1))
    return out_dir


def tiny_cache_dir() -> Path:
    return Path(os.environ.get("R1MM_CACHE", Path.home() / ".cache" / "r1_mm")) / "tiny_models"


def tiny_model_path(spec: TinySpec | None = None, cache_dir: str | Path | None = None) -> Path:
    """Path of a cached tiny model, building it first if needed (safe under concurrent processes)."""
    spec = spec or TinySpec()
    root = Path(cache_dir) if cache_dir else tiny_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / spec.key()
    if (final / "r1_mm_tiny.json").exists():
        return final
    with open(root / f".{spec.key()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "r1_mm_tiny.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
            try:
                build_tiny_model(tmp, spec)
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def parse_tiny_name(name: str, seed: int = 0) -> TinySpec:
    """``tiny:qwen2_5_vl`` / ``tiny:qwen2_vl:small`` / ``tiny:qwen2_5_vl:vocab=151936`` -> TinySpec.

    ``vocab=N`` pads the embedding and LM head to N rows (the real checkpoints' size) for runs that
    must see the memory and time of a real vocabulary."""
    parts = name.split(":")
    if parts[0] != "tiny" or len(parts) < 2:
        raise ValueError(f"'{name}' is not a tiny model name (expected tiny:<family>[:small][:vocab=N])")
    family = parts[1]
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family '{family}' in '{name}'; known: {', '.join(FAMILIES)}")
    flags = set(parts[2:])
    vocab = None
    for flag in [f for f in flags if f.startswith("vocab=")]:
        flags.discard(flag)
        if not flag[6:].isdigit():
            raise ValueError(f"tiny model option '{flag}' in '{name}' needs a number, e.g. vocab=151936")
        vocab = int(flag[6:])
    unknown = flags - {"small"}
    if unknown:
        raise ValueError(f"unknown tiny model option(s) {sorted(unknown)} in '{name}'; known: small, vocab=N")
    return TinySpec(family=family, small_vocab="small" in flags, seed=seed, model_vocab_size=vocab)
