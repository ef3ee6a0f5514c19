"""Reward plugins: registration and lookup (the batch runner is :mod:`r1_mm.rewards.runner`).

A reward follows TRL's convention: ``fn(prompts=..., completions=..., completion_ids=..., **columns)``
returns one ``float | None`` per completion (None = not applicable: left out of the weighted sum and
of that reward's mean). Rewards are found by registered name, by entry point (group
``r1_mm.rewards``), by dotted path ``pkg.module:fn`` or by file path ``path/to/file.py:fn``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from r1_mm.core.plugins import PluginError, is_plugin_name, load_object, register_entry_points
from r1_mm.core.registry import DuplicateNameError, Registry, suggest

RewardFn = Callable[..., Any]
# each entry's origin says where it comes from (``r1-mm rewards list``; a worker process can find only
# rewards whose origin is importable, see r1_mm.rewards.worker.placement)
REGISTRY: Registry[RewardFn] = Registry("reward")
ENTRY_POINT_GROUP = "r1_mm.rewards"


class RewardError(RuntimeError):
    """A reward function that failed or broke the protocol; names the function and the row."""


def reward(name: str | None = None, *, needs: tuple[str, ...] | None = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator: ``@reward("my_reward")`` registers a function under that name. ``needs``: the columns
    every row must carry for it (checked when the data loads, before the model does).

    The name given again replaces the earlier function: a plugin file named by path runs again each
    time it is loaded, and a notebook cell is run again after an edit."""

    def wrap(fn: RewardFn) -> RewardFn:
        key = name or fn.__name__
        if needs is not None:
            fn.needs = tuple(needs)
        REGISTRY.register(key, fn, replace=True)
        fn.__name__ = getattr(fn, "__name__", key)
        return fn

    return wrap


_builtins_loaded = False
_entry_points_loaded = False


BUILTIN_MODULES = ("verifiable", "spatiotemporal", "text_similarity", "shaping", "routing", "tool_use", "critic.reward")


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(f"r1_mm.rewards.{module}")


def _load_entry_points() -> None:
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        register_entry_points(ENTRY_POINT_GROUP, REGISTRY, "reward")


def get(name: str) -> RewardFn:
    """The reward callable for a registered name, dotted path or file path."""
    _load_builtins()
    if name in REGISTRY:
        return REGISTRY.get(name)
    if is_plugin_name(name):
        try:
            return load_object(name, f"reward '{name}'", kind="function")
        except PluginError as exc:
            raise RewardError(str(exc)) from exc
    _load_entry_points()
    if name in REGISTRY:
        return REGISTRY.get(name)
    raise RewardError(f"unknown reward '{name}'" + suggest(name, REGISTRY.names(), listing="registered"))


def register_object(name: str, fn: RewardFn) -> None:
    """A reward given as a Python object (``reward_funcs=``) under ``name``. It replaces one given the
    same way earlier (a notebook cell run again); a built-in, decorated or entry-point reward of that
    name is refused (:class:`DuplicateNameError`), so an object cannot silently shadow it."""
    _load_builtins()
    origin = f"object {getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', name)}"
    given_earlier = REGISTRY.origin(name).startswith("object ")
    if name in REGISTRY and REGISTRY.get(name) is not fn and not given_earlier:
        raise DuplicateNameError(f"'{name}' is already a reward ({REGISTRY.origin(name) or '?'})")
    REGISTRY.register(name, fn, replace=True, origin=origin)


def available() -> dict[str, str]:
    """Every registered reward and where it comes from."""
    _load_builtins()
    _load_entry_points()
    return {name: REGISTRY.origin(name) for name in REGISTRY.names()}


def call_reward(fn: RewardFn, **kwargs: Any) -> list[Any]:
    """Call a sync or async reward with TRL's keyword arguments.

    An async reward runs on its own event loop (see :func:`run_sync`).
    """
    result = fn(**kwargs)
    if inspect.isawaitable(result):
        result = run_sync(_await(result))
    return list(result)


def run_sync(coro: Any) -> Any:
    """Run a coroutine to completion from sync code, even inside an already running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _await(awaitable: Any) -> Any:
    return await awaitable
