"""Learners by algorithm name. Kept apart from r1_mm.train, which also runs as ``__main__``
(``accelerate launch -m r1_mm.train``) and would otherwise hold a second, empty registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TRAINERS: dict[str, Callable[[Any], object]] = {}


def register_trainer(name: str) -> Callable[[Callable[[Any], object]], Callable[[Any], object]]:
    def wrap(fn: Callable[[Any], object]) -> Callable[[Any], object]:
        TRAINERS[name] = fn
        return fn
    return wrap
