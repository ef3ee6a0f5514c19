"""The model families r1-mm trains, one module each, found by transformers' ``model_type``.

Adding a family is one module here that defines ``FAMILY`` (a :class:`~r1_mm.models.families.base.ModelFamily`)
and one line in :data:`LAZY_FAMILIES`. A model whose ``model_type`` is not listed trains only with the hf
engine (the learner's own model samples: no engine processing or weight sync can differ), after the
cheap contract (placeholders vs features, grouped vs naive: ``models/contract.py``) passed on it
before step 1; with a vLLM engine it is refused before it loads, because nothing has checked that the
engines and the weight sync give it exact numbers.
"""

from __future__ import annotations

from typing import Any

from r1_mm.core.registry import Registry, suggest
from r1_mm.models.families.base import CAPABILITIES, TESTED, ModelFamily, UnsupportedModelError

LAZY_FAMILIES = {
    "qwen2_vl": "r1_mm.models.families.qwen2_vl:FAMILY",
    "qwen2_5_vl": "r1_mm.models.families.qwen2_5_vl:FAMILY",
    "llava_onevision": "r1_mm.models.families.llava_onevision:FAMILY",
    "qwen3_vl": "r1_mm.models.families.qwen3_vl:FAMILY",
    "internvl": "r1_mm.models.families.internvl:FAMILY",
    "qwen3_vl_moe": "r1_mm.models.families.qwen3_vl_moe:FAMILY",
    "glm4v": "r1_mm.models.families.glm4v:FAMILY",
    "glm4v_moe": "r1_mm.models.families.glm4v_moe:FAMILY",
    "qwen3_5": "r1_mm.models.families.qwen3_5:FAMILY",
    "qwen3_5_moe": "r1_mm.models.families.qwen3_5_moe:FAMILY",
    "smolvlm": "r1_mm.models.families.smolvlm:FAMILY",
    "idefics3": "r1_mm.models.families.idefics3:FAMILY",
    "gemma3": "r1_mm.models.families.gemma3:FAMILY",
}
FAMILIES: Registry[ModelFamily] = Registry("model family", lazy=LAZY_FAMILIES)

__all__ = ["CAPABILITIES", "FAMILIES", "TESTED", "ModelFamily", "UnsupportedModelError", "family_of", "get_family",
           "is_verified"]


def get_family(model_type: str) -> ModelFamily:
    """The family registered as ``model_type`` (UnknownNameError with a suggestion otherwise)."""
    return FAMILIES.get(model_type)


def family_of(config: Any) -> ModelFamily:
    """The family of a model config (its ``model_type``); one-line UnsupportedModelError for any other."""
    model_type = str(getattr(config, "model_type", "") or "")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type '{model_type}' ({type(config).__name__}) is not a family r1-mm has verified, so it is not "
            f"trained (the grouped forward, the engines and the weight sync are untested for it)"
            + suggest(model_type, FAMILIES.names(), listing="supported"))
    return FAMILIES.get(model_type)


def is_verified(config: Any) -> bool:
    """Is the config's ``model_type`` one of the registered families (read through :func:`family_of`)?"""
    try:
        family_of(config)
    except UnsupportedModelError:
        return False
    return True
