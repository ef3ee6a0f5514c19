"""Tool plugins: registration and lookup, as rewards are found (:mod:`r1_mm.rewards.registry`).

A tool is registered by the ``@tool`` decorator with the JSON schema of its arguments; it is found by
registered name, by entry point (group ``r1_mm.tools``, the entry naming a decorated function), by dotted
path ``pkg.module:fn`` or by file path ``path/to/file.py:fn``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from r1_mm.core.plugins import PluginError, is_plugin_name, load_object, register_entry_points
from r1_mm.core.registry import Registry, suggest
from r1_mm.tools.base import Tool, ToolFn

REGISTRY: Registry[Tool] = Registry("tool")
ENTRY_POINT_GROUP = "r1_mm.tools"
BUILTIN_MODULES = ("crop", "video_frames")


class ToolError(RuntimeError):
    """A tool that cannot be found or is not a tool (a function never decorated)."""


def tool(name: str | None = None, *, description: str,
         parameters: Mapping[str, Any]) -> Callable[[ToolFn], ToolFn]:
    """Decorator: ``@tool("zoom", description=..., parameters={JSON schema})`` registers
    ``fn(media, **arguments) -> ToolResult | str``. The function keeps working as a plain function; its
    :class:`Tool` is ``fn.tool``. As for rewards, the name given again replaces the earlier one (a plugin
    file named by path runs again each time it is loaded)."""
    if parameters.get("type", "object") != "object":
        raise ValueError("a tool's parameters schema must describe an object ({'type': 'object', ...})")

    def wrap(fn: ToolFn) -> ToolFn:
        entry = Tool(name=name or fn.__name__, fn=fn, description=description,
                     parameters={"type": "object", **dict(parameters)})
        fn.tool = entry
        REGISTRY.register(entry.name, entry, replace=True, origin=f"{fn.__module__}:{fn.__qualname__}")
        return fn

    return wrap


_builtins_loaded = False
_entry_points_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(f"r1_mm.tools.{module}")


def _as_tool(obj: Any, what: str) -> Tool:
    if isinstance(obj, Tool):
        return obj
    if isinstance(getattr(obj, "tool", None), Tool):
        return obj.tool
    raise ToolError(f"{what} is not a tool: decorate the function with @r1_mm.tools.tool(description=..., "
                    "parameters=...) so the model can be shown its arguments")


def _load_entry_points() -> None:
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        register_entry_points(ENTRY_POINT_GROUP, REGISTRY, "tool", convert=_as_tool)


def get(name: str) -> Tool:
    """The tool for a registered name, entry point, dotted path or file path."""
    _load_builtins()
    if name in REGISTRY:
        return REGISTRY.get(name)
    if is_plugin_name(name):
        try:
            return _as_tool(load_object(name, f"tool '{name}'", kind="function"), f"'{name}'")
        except PluginError as exc:
            raise ToolError(str(exc)) from exc
    _load_entry_points()
    if name in REGISTRY:
        return REGISTRY.get(name)
    raise ToolError(f"unknown tool '{name}'" + suggest(name, REGISTRY.names(), listing="registered"))


def available() -> dict[str, str]:
    """Every registered tool and where it comes from."""
    _load_builtins()
    _load_entry_points()
    return {name: REGISTRY.origin(name) for name in REGISTRY.names()}


def option_problems(entry: Tool, kwargs: Mapping[str, Any], where: str) -> list[str]:
    """Recipe kwargs the tool's function does not take as keyword-only options (a misspelt option would
    otherwise vanish into its ``**_``)."""
    import inspect

    params = inspect.signature(entry.fn).parameters
    options = sorted(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY)
    return [f"{where}.kwargs.{key} is not an option of tool '{entry.name}'" + suggest(key, options, listing="options")
            for key in kwargs if key not in options]


def spec_problems(specs: list[Any], section: str = "tools.functions") -> list[str]:
    """Every configured tool resolves, its recipe kwargs are options it takes, and no name is given twice."""
    problems: list[str] = []
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        where = f"{section}[{i}]"
        try:
            entry = get(spec.name)
        except ToolError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if entry.name in seen:
            problems.append(f"{where}: tool '{entry.name}' is given twice")
        seen.add(entry.name)
        problems += option_problems(entry, spec.kwargs, where)
    return problems
