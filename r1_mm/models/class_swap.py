"""Give one module instance other behaviour by swapping its class for a cached subclass of its own class.

Why not methods assigned on the instance: a wrapped bound method keeps pointing at the module it was taken
from, so a deep copy (the reference model is one) would run the original's code with the original's weights
(GLM's placeholder fix did: 2.9 logits off). A class travels with the copy. The subclass keeps the base's name
and module, so reprs, PEFT's target names and lookups of the modeling module's functions see the base.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_CLASSES: dict[tuple[type, str], type] = {}


def swap_class(module: Any, marker: str, methods: Callable[[type], dict[str, Any]]) -> bool:
    """Make ``module`` an instance of ``type(module)`` with ``methods(base)`` overriding its methods (idempotent:
    a class already carrying ``marker`` is left as it is); the subclass is made once per base class and marker
    and holds the base as ``marker``. Returns whether the class was swapped now."""
    base = type(module)
    if hasattr(base, marker):
        return False
    key = (base, marker)
    if key not in _CLASSES:
        _CLASSES[key] = type(base.__name__, (base,), {**methods(base), "__module__": base.__module__, marker: base})
    module.__class__ = _CLASSES[key]
    return True
