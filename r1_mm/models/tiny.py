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

    @property
    def vocab_size(self) -> int:
        return 96 if self.small_vocab else 1024

    def key(self) -> str:
        optional = ("model_vocab_size", "text_model_type")
        fields = {k: v for k, v in asdict(self).items() if not (k in optional and v is None)}  # keys of older specs stay
        blob = json.dumps(fields, sort_keys=True) + _BUILDER_VERSION
        return f"{self.family}{'-small' if self.small_vocab else ''}-s{self.seed}-{hashlib.sha1(blob.encode()).hexdigest()[:8]}"


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
