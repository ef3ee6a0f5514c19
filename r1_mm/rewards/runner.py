"""The reward runner: calls a recipe's rewards on a batch of completions, with weights, time limits,
the error policy and per-reward metrics.

Apart from :mod:`r1_mm.rewards.registry` (which finds a reward by name) so the registry stays free of
processes and threads: the runner imports the registry and the worker, and the worker (a child process
that loads one reward by name) imports only the registry.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import numbers
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from r1_mm.rewards import budget
from r1_mm.rewards.registry import REGISTRY, RewardError, RewardFn, call_reward, get
from r1_mm.rewards.signature import accepts_keyword
from r1_mm.rewards.worker import RewardWorker, WorkerError, WorkerTimeout, placement

if TYPE_CHECKING:  # torch is imported where it is used: a reward worker process never needs it
    import torch

log = logging.getLogger(__name__)


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
        import torch

        self.total = torch.where(torch.isnan(self.total), self.total, self.total + bonus)


_RUNNERS: weakref.WeakSet[RewardRunner] = weakref.WeakSet()


@atexit.register
def _close_runners() -> None:
    """Kill every reward worker when the interpreter exits (a hung one would otherwise outlive the run)."""
    for runner in list(_RUNNERS):
        runner.close()


@dataclass
class _Call:
    """One reward's call in a batch: when the runner stops waiting for it, and what it gave."""

    j: int
    started: float  # time.monotonic()
    until: float | None  # the runner kills (worker) or abandons (inline thread) the call then; None = no limit
    limit: str  # the setting that set ``until``, for the error message
    values: list[Any] | None = None
    error: BaseException | None = None

    @property
    def soft_deadline(self) -> float | None:
        """What the reward itself is told (:mod:`r1_mm.rewards.budget`): a little before ``until``, so a
        reward that stops early (accuracy skips the math checks that no longer fit) returns in time."""
        if self.until is None:
            return None
        return self.until - min(2.0, 0.25 * (self.until - self.started))


class RewardRunner:
    """Calls every configured reward on a batch, applies weights, time limits and the error policy.

    Where each reward runs is its spec's ``isolation`` (:func:`r1_mm.rewards.worker.placement`): in a
    worker process of its own, killed and replaced when a call runs past its limit, or inline in this
    process, where a limit can only stop the waiting (the call goes on in a daemon thread, which does
    not keep the process from exiting). The workers' calls run in parallel with the inline ones, so a
    hung worker costs its own reward and no other reward's time.
    """

    def __init__(self, specs: list[Any], on_error: str = "raise", context: dict[str, Any] | None = None,
                 timeout_s: float | None = None, batch_timeout_s: float | None = None):
        """``context``: run-level keyword arguments every reward receives (e.g. max_completion_length);
        a spec's own kwargs override them. ``timeout_s``: one reward call's limit; ``batch_timeout_s``:
        the limit of all of a batch's rewards together. A call past either fails (``on_error`` applies)."""
        import torch

        self.context = dict(context or {})
        self.timeout_s, self.batch_timeout_s = timeout_s, batch_timeout_s
        self.names = [s.name for s in specs]
        self.weights = torch.tensor([float(s.weight) for s in specs])
        self.fns: list[RewardFn] = []
        self.workers: list[RewardWorker | None] = []
        self.originals = []
        self.conversational = []
        _RUNNERS.add(self)
        limited = timeout_s is not None or batch_timeout_s is not None
        for spec in specs:
            fn = get(spec.name)
            self.originals.append(fn)
            mode = getattr(spec, "completions", "auto")
            self.conversational.append(mode == "messages" or (mode == "auto" and
                                                              str(getattr(fn, "__module__", "")).startswith("trl.")))
            context = {k: v for k, v in self.context.items() if accepts_keyword(fn, k)}
            fixed = {**context, **(spec.kwargs or {})}
            source = REGISTRY.origin(spec.name)
            try:
                where = placement(spec.name, source, getattr(spec, "isolation", "auto"), limited)
            except ValueError as exc:
                raise RewardError(f"reward '{spec.name}': {exc}") from None
            self.workers.append(RewardWorker(spec.name, fixed) if where == "process" else None)
            if where == "inline" and limited and not source.startswith("r1_mm.rewards."):
                log.warning("reward '%s' runs inline (in this process): a time limit stops the wait for it, not "
                            "the call itself", spec.name)
            if fixed:
                base = fn
                fn = lambda _base=base, _kw=fixed, **kw: _base(**{**kw, **_kw})  # noqa: E731
            self.fns.append(fn)
        self.on_error = on_error
        self.failure_counts = dict.fromkeys(self.names, 0)
        self.timeout_counts = dict.fromkeys(self.names, 0)
        self._worker_metrics: dict[str, dict[str, float]] = {}

    def __call__(self, *, prompts: list[Any], completions: list[str], completion_ids: list[list[int]],
                 rows: list[dict[str, Any]], row_ids: list[str], media: list[Any] | None = None,
                 trajectories: list[dict[str, Any] | None] | None = None) -> RewardBatch:
        """``media``: per completion, the decoded images/frames the policy saw (passed as ``prompt_media``);
        ``trajectories``: per completion of a tool run, what happened in it (``TrajectoryRecord.to_dict``: its
        calls and their results, model turns, final text), passed as ``trajectories``."""
        import torch

        n = len(completions)
        columns: dict[str, list[Any]] = {}
        for key in {k for r in rows for k in r}:
            columns[key] = [r.get(key) for r in rows]
        if media is not None:
            columns["prompt_media"] = media
        if trajectories is not None:
            columns["trajectories"] = trajectories
        out = torch.full((n, len(self.fns)), float("nan"))
        failures: dict[str, int] = {}
        messages = [[{"role": "assistant", "content": c}] for c in completions]
        calls = self._run_all(lambda j: dict(prompts=prompts, completions=messages if self.conversational[j] else completions,
                                             completion_ids=completion_ids, **columns))
        for call in calls:
            name = self.names[call.j]
            try:
                if call.error is not None:
                    raise call.error
                values = call.values
                if len(values) != n:
                    raise RewardError(f"returned {len(values)} values for {n} completions")
                for i, v in enumerate(values):
                    if v is None:
                        continue
                    # numpy scalars count as numbers (numbers.Real); booleans do not
                    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                        raise RewardError(f"value {v!r} for row {row_ids[i]} is not a finite number or None")
                    out[i, call.j] = float(v)
            except Exception as exc:
                index = getattr(exc, "index", None)  # RowError: the reward says which completion failed
                failed = [row_ids[index]] if isinstance(index, int) and 0 <= index < n else row_ids
                rows_named = ", ".join(dict.fromkeys(failed))
                detail = str(exc) if isinstance(exc, WorkerError) else f"{type(exc).__name__}: {exc}"
                message = f"reward '{name}' failed on rows [{rows_named}]: {detail}"
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
        """The recipe's rewards (or ``specs``) with its error policy, time limits and run context."""
        return cls(cfg.rewards.functions if specs is None else specs, on_error=cfg.rewards.on_error,
                   context={"max_completion_length": cfg.rollout.max_completion_length},
                   timeout_s=cfg.rewards.timeout_s, batch_timeout_s=getattr(cfg.rewards, "batch_timeout_s", None))

    def _run_all(self, arguments: Callable[[int], dict[str, Any]]) -> list[_Call]:
        """Every reward's call, in spec order: the workers' calls are sent first and run while the inline
        rewards run here one after the other; then the workers' replies are collected. A worker that is
        (re)starting is waited for before the clock starts: its start-up is not the reward's time."""
        started: dict[int, Exception] = {}
        for j, worker in enumerate(self.workers):
            if worker is not None:
                try:
                    worker.ready()
                except Exception as exc:
                    started[j] = exc
        batch_end = None if self.batch_timeout_s is None else time.monotonic() + self.batch_timeout_s
        calls: dict[int, _Call] = {}
        for j in sorted(range(len(self.fns)), key=lambda j: self.workers[j] is None):
            call = calls[j] = self._limits(j, batch_end)
            call.error = started.get(j)
            if call.error is not None:
                continue
            try:
                worker = self.workers[j]
                if worker is None:
                    call.values = self._call_inline(call, arguments(j))
                else:
                    worker.submit(self._portable(j, arguments(j)), call.soft_deadline)
            except Exception as exc:
                call.error = exc
        for j, call in calls.items():
            worker = self.workers[j]
            if worker is None or call.error is not None:
                continue
            try:
                call.values, report = worker.result(call.until)
                if report is not None:
                    self._worker_metrics[self.names[j]] = report
            except WorkerTimeout:
                call.error = self._overrun(call, "; its worker process was killed")
            except Exception as exc:
                call.error = exc
        return [calls[j] for j in range(len(self.fns))]

    def _limits(self, j: int, batch_end: float | None) -> _Call:
        """A call starting now: its own limit (timeout_s) or the batch's end, whichever comes first."""
        now = time.monotonic()
        own = None if self.timeout_s is None else now + self.timeout_s
        if batch_end is not None and (own is None or batch_end < own):
            return _Call(j, now, batch_end, f"rewards.batch_timeout_s={self.batch_timeout_s:g} s (the whole batch's limit)")
        return _Call(j, now, own, f"rewards.timeout_s={self.timeout_s:g} s" if own is not None else "")

    def _overrun(self, call: _Call, what: str = "") -> RewardError:
        self.timeout_counts[self.names[call.j]] += 1
        return RewardError(f"took longer than {call.limit}{what}")

    def _call_inline(self, call: _Call, kwargs: dict[str, Any]) -> list[Any]:
        """The call in this process; under a limit in a daemon thread that is abandoned at the limit."""
        fn = self.fns[call.j]
        if call.until is None:
            return call_reward(fn, **kwargs)
        box: dict[str, Any] = {}
        done = threading.Event()

        def target() -> None:
            try:
                with budget.until(call.soft_deadline):
                    box["values"] = call_reward(fn, **kwargs)
            except BaseException as exc:  # handed to the waiting thread
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=target, daemon=True, name=f"r1mm-reward-{self.names[call.j]}").start()
        if not done.wait(max(0.0, call.until - time.monotonic())):
            raise self._overrun(call, "; the call goes on in a thread (isolation: inline)")
        if "error" in box:
            raise box["error"]
        return box["values"]

    def _portable(self, j: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A worker's arguments: ``prompt_media`` only if the reward takes it, and without the processor's
        tensors (the worker would have to import torch to read them, and no reward needs them)."""
        media = kwargs.pop("prompt_media", None)
        if media is not None and accepts_keyword(self.originals[j], "prompt_media"):
            light: dict[int, Any] = {}
            kwargs["prompt_media"] = [light.setdefault(id(m), _without_inputs(m)) for m in media]
        return kwargs

    def close(self) -> None:
        """Kill the reward workers (also done at exit)."""
        for worker in self.workers:
            if worker is not None:
                worker.close()

    def metrics(self) -> dict[str, float]:
        """Counters that rewards expose through a ``metrics()`` attribute (e.g. the critic's unparsable;
        a worker's as of its last call), each reward's calls that ran past a limit, and math-verify's
        checks killed at their limit or skipped for the batch's time budget; under each reward's metric
        name (a plugin's function name, not its file path)."""
        from r1_mm.rewards import math_check
        from r1_mm.rewards.reward_metrics import metric_labels

        out: dict[str, float] = {}
        labels = metric_labels(self.names)
        label_of = dict(zip(self.names, labels, strict=True))
        for name, label, fn, worker in zip(self.names, labels, self.originals, self.workers, strict=True):
            report = getattr(fn, "metrics", None)
            values = self._worker_metrics.get(name, {}) if worker is not None else report() if callable(report) else {}
            out.update({f"rewards/{label}/{k}": float(v) for k, v in values.items()})
        out.update({f"rewards/{label_of.get(name, name)}/timeouts": float(c) for name, c in self.timeout_counts.items()
                    if c})
        checker = math_check._checker
        if checker is not None and (checker.timeouts or checker.over_budget):
            out["rewards/math_verify/timeouts"] = float(checker.timeouts)
            out["rewards/math_verify/over_budget"] = float(checker.over_budget)
        return out

    def score_groups(self, samples: list[Any], groups: list[list[Any]]) -> RewardBatch:
        """Rewards of each sample's group of completions (objects with .text and .token_ids), flattened
        in order; the samples themselves go along as ``prompt_media`` (their decoded images / frames)."""
        pairs = [(s, c) for s, group in zip(samples, groups, strict=True) for c in group]
        records = [getattr(c, "trajectory", None) for _, c in pairs]
        trajectories = [r.to_dict() if r is not None else None for r in records] if any(records) else None
        return self(prompts=[s.messages for s, _ in pairs], completions=[c.text for _, c in pairs],
                    completion_ids=[c.token_ids for _, c in pairs], rows=[s.row for s, _ in pairs],
                    row_ids=[s.row_id for s, _ in pairs], media=[s for s, _ in pairs], trajectories=trajectories)


def _without_inputs(sample: Any) -> Any:
    """A prompt's media without its processor output (``Sample.inputs``), for sending to a worker."""
    if dataclasses.is_dataclass(sample) and getattr(sample, "inputs", None) is not None:
        return dataclasses.replace(sample, inputs=None)
    return sample
