"""Load the policy, its frozen reference and the processor; apply freezing, LoRA and dtype.

Model names are whatever ``from_pretrained`` accepts (hub id or local folder), plus the built-in
``tiny:<family>[:small]`` models that ``r1_mm.testing`` builds offline, plus an r1-mm run folder (its last
checkpoint's model: how a GRPO recipe starts from an SFT run).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from r1_mm.config.recipe import ModelConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_model_path(cfg: ModelConfig) -> str:
    """Built-in tiny names become a cached local folder (built on first use); an r1-mm run folder becomes its last
    checkpoint's model (a recipe chain: GRPO from an SFT run); others pass through."""
    if cfg.name_or_path.startswith("tiny:"):
        from r1_mm.models.tiny import parse_tiny_name, tiny_model_path

        return str(tiny_model_path(parse_tiny_name(cfg.name_or_path, seed=cfg.tiny_seed)))
    last = last_run_model(cfg.name_or_path)
    return str(last) if last is not None else cfg.name_or_path


def last_run_model(folder: str) -> Path | None:
    """``folder/checkpoints/step-N/model`` with the largest N, when ``folder`` is a run folder (it holds no model of
    its own, and its checkpoints hold plain transformers folders); None otherwise."""
    root = Path(folder)
    if not root.is_dir() or (root / "config.json").exists():
        return None
    models = [p for p in (root / "checkpoints").glob("step-*/model") if (p / "config.json").exists()]
    steps = [(int(p.parent.name.split("-", 1)[1]), p) for p in models if p.parent.name.split("-", 1)[1].isdigit()]
    return max(steps)[1] if steps else None


def load_processor(cfg: ModelConfig) -> Any:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(resolve_model_path(cfg), trust_remote_code=cfg.trust_remote_code)
    return prepare_processor(processor)


def prepare_processor(processor: Any) -> Any:
    """Batched rollouts and scoring pad: a tokenizer without a pad token pads with its EOS token."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def vision_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The vision tower (and its projector), found by module role rather than by model-id checks."""
    inner = getattr(model, "model", model)
    found = []
    for name in ("visual", "vision_tower", "vision_model", "multi_modal_projector"):
        module = getattr(inner, name, None) or getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            found.append(module)
    return found


def load_model(cfg: ModelConfig, *, trainable: bool = True, grouped: bool = False) -> torch.nn.Module:
    """``grouped``: the language model's attention also serves the grouped forward (packed completions);
    calls without a packed layout (generation) run the requested attention unchanged."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        resolve_model_path(cfg), dtype=_DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )
    return prepare_model(model, cfg, trainable=trainable, grouped=grouped)


def inference_device() -> torch.device:
    """Where a job without a learner runs its model: this process's GPU when there is one (the local
    rank's under a launcher), else the CPU."""
    import os

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_for_inference(cfg: ModelConfig, engine: str) -> torch.nn.Module:
    """The model of a job without a learner (rollout, TPO pair building, evaluation). With the hf engine
    it samples, so it goes to the GPU; the vLLM engines load their own copy on the device, and this one
    stays on the CPU (it only serves weight names and the export)."""
    model = load_model(cfg, trainable=False).eval()
    return model.to(inference_device()) if engine == "hf" else model


def prepare_model(model: torch.nn.Module, cfg: ModelConfig, *, trainable: bool = True,
                  grouped: bool = False) -> torch.nn.Module:
    """What r1-mm does to a loaded model, also for a model object given through the Python API: its
    family's corrections, the recipe's dtype and attention, the grouped forward's attention, freezing,
    checkpointing, LoRA."""
    from r1_mm.models.families import FAMILIES

    family = FAMILIES.get(model.config.model_type) if model.config.model_type in FAMILIES else None
    if family is not None and family.prepare is not None:
        family.prepare(model)  # e.g. positions as the checkpoint was trained (families/rope_index.py)
    if cfg.dtype != "auto" and next(model.parameters()).dtype != _DTYPES[cfg.dtype]:
        model = model.to(_DTYPES[cfg.dtype])
    current = getattr(model.config, "_attn_implementation", None)
    if cfg.attn_implementation and current != cfg.attn_implementation and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(cfg.attn_implementation)
    if grouped:
        from r1_mm.models.forward import packed_attention

        packed_attention.enable(model)
    if not trainable:
        model.eval()
        model.requires_grad_(False)
        return model
    if cfg.freeze_vision_tower:
        towers = vision_modules(model)
        if not towers:
            raise ValueError(f"model.freeze_vision_tower is set but no vision tower was found in "
                             f"{type(model).__name__}")
        for tower in towers:
            tower.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora:
        model = apply_lora(model, cfg)
    return model


def apply_lora(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """Wrap the language model's linear layers with LoRA adapters; the vision tower's and projector's too with
    ``model.lora_vision`` (the family's ``lora_vision_targets``, name suffixes inside the vision modules)."""
    from peft import LoraConfig, get_peft_model

    vision_prefixes = tuple(n for n, m in model.named_modules() if any(m is t for t in vision_modules(model)))
    targets = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in cfg.lora_target_modules
               and not n.startswith(vision_prefixes)]
    if not targets:
        raise ValueError(f"model.lora_target_modules={cfg.lora_target_modules} matched no linear layer")
    if cfg.lora_vision:
        targets += vision_lora_targets(model)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none")
    with _exact_lora_targets():
        return get_peft_model(model, lora)


def vision_lora_targets(model: torch.nn.Module) -> list[str]:
    """Names of the vision tower's and projector's linear layers ``model.lora_vision`` wraps (its family's
    ``lora_vision_targets``); a family without them is refused in one line."""
    from r1_mm.models.families import FAMILIES
    from r1_mm.models.families.base import UnsupportedModelError

    model_type = model.config.model_type
    family = FAMILIES.get(model_type) if model_type in FAMILIES else None
    suffixes = family.lora_vision_targets if family is not None else ()
    if not suffixes:
        raise UnsupportedModelError(f"model.lora_vision: no vision LoRA targets are declared for {model_type} "
                                    "(tested: qwen2_vl, qwen2_5_vl, qwen3_vl)")
    vision_prefixes = tuple(n + "." for n, m in model.named_modules() if any(m is t for t in vision_modules(model)))
    targets = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith(vision_prefixes)
               and any(n.endswith("." + s) for s in suffixes)]
    if not targets:
        raise UnsupportedModelError(f"model.lora_vision: {model_type}'s vision targets {list(suffixes)} matched no "
                                    "linear layer")
    return targets


@contextmanager
def _exact_lora_targets() -> Iterator[None]:
    """PEFT's conversion of transformers-v4 MoE adapters off while a new adapter is made.

    Why: for a model transformers loads in qwen2_moe's expert layout (GLM-4.5V), PEFT takes every target
    named gate_proj/up_proj/down_proj for a v4 expert projection and moves it onto the fused experts'
    parameters: the dense MLPs and shared experts lost their adapters, and the experts got nested parameter
    adapters the weight sync neither names nor merges (vLLM refused the update). r1-mm's targets are exact
    linear layers, so nothing is converted."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:
        yield
        return
    original = conversion._convert_peft_config_moe
    conversion._convert_peft_config_moe = lambda *_args, **_kwargs: None
    try:
        yield
    finally:
        conversion._convert_peft_config_moe = original
