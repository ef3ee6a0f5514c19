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

from r1_mm.models.families import FAMILIES as FAMILY_REGISTRY
from r1_mm.models.families import get_family
from r1_mm.models.families.tiny_parts import QWEN_SPECIAL_TOKENS

# family -> the model it stands for (what `r1-mm make-tiny --help` names)
FAMILY_NAMES = {name: get_family(name).display_name for name in FAMILY_REGISTRY.names()}
FAMILIES = tuple(FAMILY_NAMES)

# Reasoning/answer tags are single tokens so that an RL demo can reach the answer format.
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
# With ``tools``: the tags of Qwen's tool calls and results, single tokens as in the real Qwen tokenizers.
TOOL_TAG_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


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
    # the text decoder's model_type when the family offers another than its default (InternVL: "qwen3" or
    # "qwen3_moe", InternVL3.5's dense and MoE decoders); None = the family's default
    text_model_type: str | None = None
    # a tokenizer that can write Hermes tool calls (JSON punctuation, crop_image's names, the tool tags as single
    # tokens) even with the small vocabulary: the zoom-in demo's policy must be able to call a tool
    tools: bool = False

    @property
    def vocab_size(self) -> int:
        if self.small_vocab:
            return 256 if self.tools else 96
        return 1024

    def key(self) -> str:
        optional = ("model_vocab_size", "text_model_type", "tools")
        fields = {k: v for k, v in asdict(self).items() if not (k in optional and not v)}  # keys of older specs stay
        blob = json.dumps(fields, sort_keys=True) + _BUILDER_VERSION
        return f"{self.family}{'-small' if self.small_vocab else ''}{'-tools' if self.tools else ''}-s{self.seed}-{hashlib.sha1(blob.encode()).hexdigest()[:8]}"


_BUILDER_VERSION = "4"  # 3: checkpoint-format names (LLaVA-OneVision's vision_model prefix); 4: expert layout


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


def _tools_corpus() -> list[str]:
    """Tool-call text (the Hermes format of Qwen's templates, crop_image's schema and results), so that the small
    vocabulary can write a call in a few tokens."""
    boxes = [[0, 0, 14, 14], [42, 0, 56, 14], [0, 42, 14, 56], [42, 42, 56, 56], [0, 0, 28, 28], [28, 28, 56, 56]]
    lines = [
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
        "function signatures within <tools></tools> XML tags:\n<tools>\n</tools>\n\nFor each function call, return "
        'a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n'
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>',
        '{"type": "function", "function": {"name": "crop_image", "description": "Zoom into a region of an image: '
        'returns that region at full resolution.", "parameters": {"type": "object", "properties": {"bbox_2d": '
        '{"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4, "description": "the region '
        'to zoom into, [x1, y1, x2, y2]: top-left and bottom-right corners"}, "image_index": {"type": "integer", '
        '"description": "which image of the question (0 = the first); default 0"}, "label": {"type": "string", '
        '"description": "optional: what the region shows"}}, "required": ["bbox_2d"]}}}',
        "How many squares are in the top-left corner? top-right bottom-left bottom-right",
        "Error: unknown tool; the tools are: crop_image. Zoomed into of image 0 (56x56 px).",
    ]
    for box in boxes:
        call = '{"name": "crop_image", "arguments": {"bbox_2d": ' + str(box) + "}}"
        lines += [f"<tool_call>\n{call}\n</tool_call>"] * 8 + [
            f"<tool_response>\nZoomed into {[float(v) for v in box]} of image 0.\n</tool_response>"]
    return lines * 4


def build_tokenizer(spec: TinySpec):
    """Train a byte-level BPE with digits split one per token, wrapped as a fast HF tokenizer."""
    family = get_family(spec.family)
    extra_special_tokens = family.media_tokens
    specials = QWEN_SPECIAL_TOKENS[1:] + list(extra_special_tokens)
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        # tools: no word split, so that a call's fixed JSON (`{"name": "crop_image", "arguments": {"bbox_2d": [`)
        # becomes a few tokens and a tiny policy writes a whole call in about a dozen
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not spec.tools),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - len(QWEN_SPECIAL_TOKENS) - len(TAG_TOKENS) - len(extra_special_tokens)
        - (len(TOOL_TAG_TOKENS) if spec.tools else 0),
        min_frequency=2,
        # small vocab: only the corpus's own characters (digits are then ~1/8 of the vocabulary, which
        # makes answers reachable by a random policy); text outside that alphabet is dropped.
        initial_alphabet=[] if spec.small_vocab else pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tags = TAG_TOKENS + (TOOL_TAG_TOKENS if spec.tools else [])
    corpus = _training_corpus() + (_tools_corpus() if spec.tools else [])
    tok.train_from_iterator(corpus, trainer=trainer)
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
    fast.add_tokens(tags)  # ordinary (decoded) tokens, but never split
    fast.chat_template = family.chat_template
    fast.padding_side = "left"
    return fast


def build_tiny_model(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Build a tiny model + processor and ``save_pretrained`` both into ``out_dir``."""
    import torch
    from transformers import AutoModelForImageTextToText

    spec = spec or TinySpec()
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown tiny model family '{spec.family}'; known: {', '.join(FAMILIES)}")
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(spec)
    config, processor = get_family(spec.family).build_tiny(spec, tokenizer)
    if spec.text_model_type is not None and config.get_text_config().model_type != spec.text_model_type:
        raise ValueError(f"the tiny {spec.family} model has no '{spec.text_model_type}' text decoder "
                         f"(it builds '{config.get_text_config().model_type}')")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.do_sample = False
    out_dir.mkdir(parents=True, exist_ok=True)
    # saved in the checkpoint format a hub model has (and vLLM's loaders read): transformers reverts its
    # in-memory renames on save, but for a model built from a config it skips the prefix changes
    # (LLaVA-OneVision's vision_tower.vision_model.*), unless the conversions are recorded as loaded ones, and
    # it writes fused experts in the in-memory layout (see checkpoint_conversions)
    from r1_mm.models.weights import checkpoint_conversions

    model._weight_conversions = checkpoint_conversions(model)
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
    """``tiny:qwen2_5_vl`` / ``tiny:qwen2_vl:small`` / ``tiny:qwen2_5_vl:small:tools`` /
    ``tiny:qwen2_5_vl:vocab=151936`` -> TinySpec.

    ``tools``: the tokenizer can write Hermes tool calls (the zoom-in demo). ``vocab=N`` pads the embedding and LM head to N rows (the real checkpoints' size) for runs that
    must see the memory and time of a real vocabulary."""
    parts = name.split(":")
    if parts[0] != "tiny" or len(parts) < 2:
        raise ValueError(f"'{name}' is not a tiny model name (expected tiny:<family>[:small][:tools][:vocab=N])")
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
    unknown = flags - {"small", "tools"}
    if unknown:
        raise ValueError(f"unknown tiny model option(s) {sorted(unknown)} in '{name}'; known: small, tools, vocab=N")
    return TinySpec(family=family, small_vocab="small" in flags, seed=seed, model_vocab_size=vocab,
                    tools="tools" in flags)
