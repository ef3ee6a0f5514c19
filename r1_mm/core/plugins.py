"""Loading user code named in a recipe: ``path/to/file.py:name`` or ``package.module:name``.

Rewards and trackers are named the same way, so one loader serves both and its errors read alike.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any


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
