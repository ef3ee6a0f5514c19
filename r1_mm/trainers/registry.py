"""Learners by algorithm name. Kept apart from r1_mm.train, which also runs as ``__main__``
(``accelerate launch -m r1_mm.train``) and would otherwise hold a second, empty registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from r1_mm.core.registry import Registry

TRAINERS: Registry[Callable[[Any], object]] = Registry("algorithm")


def register_trainer(name: str) -> Callable[[Callable[[Any], object]], Callable[[Any], object]]:
    """``@register_trainer("grpo")`` on the function that runs a recipe of that ``algorithm.name``."""
    return TRAINERS.register(name)
