"""Loading user code named in a recipe: ``path/to/file.py:name`` or ``package.module:name``.

Rewards and trackers are named the same way, so one loader serves both and its errors read alike.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class PluginError(ValueError):
    pass


def is_plugin_name(name: str) -> bool:
    return ":" in name


def load_object(name: str, what: str, kind: str = "object") -> Any:
    """The object a ``target:attr`` name points at; ``what`` says who asked (e.g. "reward 'x.py:f'"),
    ``kind`` what the attribute should be (e.g. "function"), both for the error message."""
    target, attr = name.rsplit(":", 1)
    if target.endswith(".py"):
        file = Path(target).expanduser()
        if not file.exists():
            raise PluginError(f"{what}: file not found: {file}")
        spec = importlib.util.spec_from_file_location(f"r1_mm_user_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        where = str(file)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise PluginError(f"{what}: cannot import module '{target}' ({exc})") from exc
        where = f"module '{target}'"
    if not hasattr(module, attr):
        raise PluginError(f"{what}: {where} has no {kind} '{attr}'")
    return getattr(module, attr)


def register_entry_points(group: str, registry: Any, kind: str,
                          convert: Callable[[Any, str], Any] = lambda obj, what: obj) -> None:
    """Every entry point of ``group`` (installed packages' plugins) into ``registry``, each object passed through
    ``convert(obj, what)`` first. A built-in or registered name wins over an entry point's. One that fails to
    load (or to convert) is logged and left out: a broken plugin must not hide the others, but must be visible."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        try:
            obj = convert(ep.load(), f"entry point {ep.value}")
        except Exception as exc:
            log.error("%s entry point %s (%s) failed to load: %s", kind, ep.name, ep.value, exc)
            continue
        if ep.name not in registry:
            registry.register(ep.name, obj, origin=f"entry point {ep.value} ({ep.dist.name if ep.dist else '?'})")
