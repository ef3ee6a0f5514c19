"""Loading user code named in a recipe: ``path/to/file.py:name`` or ``package.module:name``.

Rewards and trackers are named the same way, so one loader serves both and its errors read alike.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any


class PluginError(ValueError):
    pass


def is_plugin_name(name: str) -> bool:
    return ":" in name


def display_names(names: list[str]) -> list[str]:
    """How named objects appear in metric keys: ``dir/file.py:fn`` and ``pkg.module:fn`` as ``fn`` (a file
    path in a metric key differs per machine and its slashes split the key into nested W&B panels);
    a short name two entries would share keeps its full spec, so no two metrics collide."""
    short = [name.rsplit(":", 1)[1] if is_plugin_name(name) else name for name in names]
    counts = Counter(short)
    return [s if counts[s] == 1 else name for s, name in zip(short, names, strict=True)]


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
