"""Reward plugins: registration, lookup and the batch runner.

A reward follows TRL's convention: ``fn(prompts=..., completions=..., completion_ids=..., **columns)``
returns one ``float | None`` per completion (None = not applicable: left out of the weighted sum and
of that reward's mean). Rewards are found by registered name, by entry point (group
``r1_mm.rewards``), by dotted path ``pkg.module:fn`` or by file path ``path/to/file.py:fn``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import numpy as np
import torch

from r1_mm.plugins import PluginError, is_plugin_name, load_object

log = logging.getLogger(__name__)

RewardFn = Callable[..., Any]
REGISTRY: dict[str, RewardFn] = {}
SOURCES: dict[str, str] = {}
ENTRY_POINT_GROUP = "r1_mm.rewards"


class RewardError(RuntimeError):
    """A reward function that failed or broke the protocol; names the function and the row."""


def reward(name: str | None = None, *, needs: tuple[str, ...] | None = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator: ``@reward("my_reward")`` registers a function under that name. ``needs``: the columns
    every row must carry for it (checked when the data loads, before the model does)."""

    def wrap(fn: RewardFn) -> RewardFn:
        key = name or fn.__name__
        if needs is not None:
            fn.needs = tuple(needs)
        REGISTRY[key] = fn
        SOURCES[key] = f"{fn.__module__}:{fn.__qualname__}"
        fn.__name__ = getattr(fn, "__name__", key)
        return fn

    return wrap


_builtins_loaded = False
_entry_points_loaded = False


BUILTIN_MODULES = ("verifiable", "spatiotemporal", "text_similarity", "shaping", "routing", "critic.reward")


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(f"r1_mm.rewards.{module}")


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            fn = ep.load()
        except Exception as exc:  # a broken plugin must not hide the others, but must be visible
            log.error("reward entry point %s (%s) failed to load: %s", ep.name, ep.value, exc)
            continue
        REGISTRY.setdefault(ep.name, fn)
        SOURCES.setdefault(ep.name, f"entry point {ep.value} ({ep.dist.name if ep.dist else '?'})")


def get(name: str) -> RewardFn:
    """The reward callable for a registered name, dotted path or file path."""
    _load_builtins()
    if name in REGISTRY:
        return REGISTRY[name]
    if is_plugin_name(name):
        try:
            return load_object(name, f"reward '{name}'", kind="function")
        except PluginError as exc:
            raise RewardError(str(exc)) from exc
    _load_entry_points()
    if name in REGISTRY:
        return REGISTRY[name]
    import difflib

    close = difflib.get_close_matches(name, list(REGISTRY), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; registered: {', '.join(sorted(REGISTRY))}"
    raise RewardError(f"unknown reward '{name}'" + hint)


def available() -> dict[str, str]:
    """Every registered reward and where it comes from."""
    _load_builtins()
    _load_entry_points()
    return dict(sorted(SOURCES.items()))


def accepts_keyword(fn: RewardFn, name: str) -> bool:
    """Does ``fn`` take ``name`` as a keyword (by name or through ``**kwargs``)?"""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == name and p.kind is not p.POSITIONAL_ONLY) for p in params)


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


@dataclass
class RewardBatch:
    """Rewards of N completions: per function (NaN = None) and the weighted total."""

    per_function: torch.Tensor  # (N, F)
    total: torch.Tensor  # (N,) weighted sum ignoring NaN; NaN where every reward is None
    names: list[str]
    failures: dict[str, int] = field(default_factory=dict)

    def add_bonus(self, bonus: torch.Tensor) -> None:
        """Add a shaping bonus (T-GRPO, length control) to the total; a NaN total (no reward applied to
        that completion) stays NaN rather than becoming the bonus alone."""
        self.total = torch.where(torch.isnan(self.total), self.total, self.total + bonus)


class RewardRunner:
    """Calls every configured reward on a batch, applies weights and the error policy."""

    def __init__(self, specs: list[Any], on_error: str = "raise", context: dict[str, Any] | None = None,
                 timeout_s: float | None = None):
        """``context``: run-level keyword arguments every reward receives (e.g. max_completion_length);
        a spec's own kwargs override them. ``timeout_s``: a call that takes longer fails (the policy
        ``on_error`` then applies); the call itself cannot be stopped and finishes in the background."""
        self.context = dict(context or {})
        self.timeout_s = timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="r1mm-reward") \
            if timeout_s else None
        self.names = [s.name for s in specs]
        self.weights = torch.tensor([float(s.weight) for s in specs])
        self.fns = []
        self.originals = []
        self.conversational = []
        for spec in specs:
            fn = get(spec.name)
            self.originals.append(fn)
            mode = getattr(spec, "completions", "auto")
            self.conversational.append(mode == "messages" or (mode == "auto" and
                                                              str(getattr(fn, "__module__", "")).startswith("trl.")))
            context = {k: v for k, v in self.context.items() if accepts_keyword(fn, k)}
            fixed = {**context, **(spec.kwargs or {})}
            if fixed:
                base = fn
                fn = lambda _base=base, _kw=fixed, **kw: _base(**{**kw, **_kw})  # noqa: E731
            self.fns.append(fn)
        self.on_error = on_error
        self.failure_counts = dict.fromkeys(self.names, 0)

    def __call__(self, *, prompts: list[Any], completions: list[str], completion_ids: list[list[int]],
                 rows: list[dict[str, Any]], row_ids: list[str], media: list[Any] | None = None) -> RewardBatch:
        """``media``: per completion, the decoded images/frames the policy saw (passed as ``prompt_media``)."""
        n = len(completions)
        columns: dict[str, list[Any]] = {}
        for key in {k for r in rows for k in r}:
            columns[key] = [r.get(key) for r in rows]
        if media is not None:
            columns["prompt_media"] = media
        out = torch.full((n, len(self.fns)), float("nan"))
        failures: dict[str, int] = {}
        messages = [[{"role": "assistant", "content": c}] for c in completions]
        for j, (name, fn) in enumerate(zip(self.names, self.fns, strict=True)):
            try:
                values = self._call(fn, prompts=prompts, completions=messages if self.conversational[j] else completions,
                                    completion_ids=completion_ids, **columns)
                if len(values) != n:
                    raise RewardError(f"returned {len(values)} values for {n} completions")
                for i, v in enumerate(values):
                    if v is None:
                        continue
                    # numpy scalars count as numbers (numbers.Real); booleans do not
                    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                        raise RewardError(f"value {v!r} for row {row_ids[i]} is not a finite number or None")
                    out[i, j] = float(v)
            except Exception as exc:
                index = getattr(exc, "index", None)  # RowError: the reward says which completion failed
                failed = [row_ids[index]] if isinstance(index, int) and 0 <= index < n else row_ids
                rows_named = ", ".join(dict.fromkeys(failed))
                message = f"reward '{name}' failed on rows [{rows_named}]: {type(exc).__name__}: {exc}"
                if self.on_error == "raise":
                    raise RewardError(message) from exc
                self.failure_counts[name] += 1
                failures[name] = failures.get(name, 0) + 1
                log.warning("%s (rewards.on_error=none: scored None)", message)
        weighted = out * self.weights[None, :]
        total = torch.nansum(weighted, dim=1)
        total[torch.isnan(out).all(dim=1)] = float("nan")
        return RewardBatch(per_function=out, total=total, names=list(self.names), failures=failures)

    @classmethod
    def from_recipe(cls, cfg: Any, specs: list[Any] | None = None) -> RewardRunner:
        """The recipe's rewards (or ``specs``) with its error policy, time limit and run context."""
        return cls(cfg.rewards.functions if specs is None else specs, on_error=cfg.rewards.on_error,
                   context={"max_completion_length": cfg.rollout.max_completion_length},
                   timeout_s=cfg.rewards.timeout_s)

    def _call(self, fn: RewardFn, **kwargs: Any) -> list[Any]:
        if self._pool is None:
            return call_reward(fn, **kwargs)
        future = self._pool.submit(call_reward, fn, **kwargs)
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise RewardError(f"took longer than rewards.timeout_s={self.timeout_s:g} s") from None

    def metrics(self) -> dict[str, float]:
        """Counters that rewards expose through a ``metrics()`` attribute (e.g. the critic's unparsable),
        under the reward's metric name (a plugin's function name, not its file path)."""
        from r1_mm.rewards.reward_metrics import metric_labels

        out: dict[str, float] = {}
        for name, fn in zip(metric_labels(self.names), self.originals, strict=True):
            report = getattr(fn, "metrics", None)
            if callable(report):
                out.update({f"rewards/{name}/{k}": float(v) for k, v in report().items()})
        return out

    def score_groups(self, samples: list[Any], groups: list[list[Any]]) -> RewardBatch:
        """Rewards of each sample's group of completions (objects with .text and .token_ids), flattened
        in order; the samples themselves go along as ``prompt_media`` (their decoded images / frames)."""
        pairs = [(s, c) for s, group in zip(samples, groups, strict=True) for c in group]
        return self(prompts=[s.messages for s, _ in pairs], completions=[c.text for _, c in pairs],
                    completion_ids=[c.token_ids for _, c in pairs], rows=[s.row for s, _ in pairs],
                    row_ids=[s.row_id for s, _ in pairs], media=[s for s, _ in pairs])
