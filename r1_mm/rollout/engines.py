"""Rollout engines by ``rollout.engine`` name: ``make_engine(name, model=..., processor=..., cfg=...)``.

Every built-in engine is a lazy entry naming its class, so a run imports only the engine it uses
(transformers' ``generate`` for hf, vLLM for the others), and the engine modules need not import this
table: it names them, they import only the interface in :mod:`r1_mm.rollout.base` (a table that its
entries import back would be an import cycle). A third-party engine registers itself with
``@register_engine("name")`` on its class or factory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from r1_mm.core.registry import Registry

if TYPE_CHECKING:
    from r1_mm.rollout.base import RolloutEngine

LAZY_ENGINES = {"hf": "r1_mm.rollout.hf:HFRolloutEngine", "vllm_colocate": "r1_mm.rollout.vllm_colocate:VLLMColocateEngine",
                "vllm_pool": "r1_mm.rollout.vllm_pool:VLLMPoolEngine"}
ENGINES: Registry[Callable[..., RolloutEngine]] = Registry("rollout.engine", lazy=LAZY_ENGINES)


def register_engine(name: str) -> Callable[[Callable[..., RolloutEngine]], Callable[..., RolloutEngine]]:
    """``@register_engine("name")`` on an engine class or factory (called with model, processor and cfg)."""
    return ENGINES.register(name)


def make_engine(name: str, **kwargs: Any) -> RolloutEngine:
    """The engine ``name`` built with ``kwargs``; an unknown name raises ValueError (UnknownNameError)
    with the closest engine name."""
    return ENGINES.get(name)(**kwargs)
