"""Asynchronous rollouts (``rollout.max_staleness`` = K > 0): the next steps' batches are sampled while the
learner trains, by weights at most K optimizer steps old.

Versions: the engine's weights after ``v`` optimizer steps are version ``v``; the learner at step ``t`` holds
version ``t`` (before its update). Step ``s``'s rollouts are started only once the engine holds version
``>= s - K``, so the batch the learner trains on at step ``t`` was sampled by a version in ``[t - K, t]``: no
sample is ever older than K, by construction (checked again when the learner takes it). When the producer
keeps up, every batch after the first K is exactly K versions old. The learner's importance weights use the
sampler's logprobs as the behaviour policy (``algorithm.grpo.rollout_is``), so the update stays correct
off-policy, and the PPO clip is taken against them too (``algorithm.grpo.clip_against``, auto), so one update
cannot move the policy far from the one that sampled (README: at the demo's step size the learner-anchored clip,
which never acts, let K=1 oscillate into collapse).

Two schedules, chosen by the engine (``generates_beside_learner``):

* concurrent (vllm_pool): a producer thread calls the engine for steps ``s = t+1, ...`` while the learner
  trains step ``t``; the learner pushes new weights between two of the producer's generate calls (an engine
  lock: never mid-request), then the producer may start the next step.
* interleaved (hf, vllm_colocate): the engine shares the learner's device (hf samples from the learner's own
  model object; the colocated vLLM sleeps while the learner holds the device), so there is no thread: at step
  ``t``, before the update, the engine samples step ``t + K``'s batch with the current weights (version ``t``),
  and the learner trains on step ``t``'s (sampled at step ``t - K``). The hf engine therefore needs no copy of
  the weights: whatever it samples from is the live model at a known version.

Prompts are drawn from the stream in step order, as the synchronous loop draws them, and the sampling seed is
the step's (not the producer's clock), so with the same weights a batch is the synchronous loop's batch.
Resume: every batch records the stream's state before its prompts were drawn; a checkpoint after ``n`` steps
stores the state before step ``n``'s prompts, so batches in flight are drawn and sampled again on resume
(none trained twice, none skipped).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class RolloutTimeout(RuntimeError):
    """The learner waited longer than ``rollout.async_wait_timeout_s`` for its next batch."""


@dataclass
class Produced:
    """One step's rollouts as the producer made them."""

    step: int  # the learner step it is for
    value: Any  # what ``produce`` returned (the trainer's Experience)
    version: int  # the weights version that sampled it
    data_state: dict[str, Any]  # the prompt stream's state before this step's prompts were drawn
    started: float  # wall clock (time.time()) around the producer's call
    finished: float


def _overlap(spans: list[tuple[float, float]], start: float, end: float) -> float:
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans)


class AsyncRollouts:
    """The producer of a run's rollout batches and its bookkeeping (versions, waits, stream states).

    ``produce(step, version)`` makes step ``step``'s batch with the engine's current weights (version
    ``version``); ``stream_state()`` is the prompt stream's state. The learner calls :meth:`take` for each
    step, :meth:`push` to hand new weights to the engine, :meth:`data_state` when it checkpoints, and
    :meth:`close` at the end."""

    def __init__(self, produce: Callable[[int, int], Any], stream_state: Callable[[], dict[str, Any]], *,
                 first_step: int, max_steps: int, max_staleness: int, concurrent: bool, timeout_s: float,
                 advance: Callable[[Any, int], None] | None = None, finish: Callable[[Any, int], Any] | None = None):
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.produce, self.stream_state = produce, stream_state
        # partial rollouts: ``advance(value, version)`` continues a made, untaken batch by one more segment (before
        # each new step is made); ``finish(value, version)`` completes the batch the learner takes, with the weights
        # of that moment. Both run holding the engine lock.
        self.advance, self.finish = advance, finish
        self.max_steps, self.k, self.concurrent, self.timeout_s = max_steps, max_staleness, concurrent, timeout_s
        self.version = first_step  # the learner resumes (or starts) with the weights of its step
        self.next_step = first_step  # the next step the producer starts
        self.ready: dict[int, Produced] = {}
        self.states: dict[int, dict[str, Any]] = {}  # stream state before each started, untrained step's prompts
        self.busy: list[tuple[float, float]] = []  # the producer's generate spans
        self.learner_waits: list[tuple[float, float]] = []
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.engine_lock = threading.Lock()  # held by the producer while it samples, by the learner while it pushes
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.last_boundary = time.time()

    @contextlib.contextmanager
    def engine(self, what: str) -> Iterator[None]:
        """The engine, for the learner (weight push, finishing a batch, eval): waited for at most ``timeout_s``
        (the producer's current generate call ends first)."""
        if not self.engine_lock.acquire(timeout=self.timeout_s):
            raise RolloutTimeout(f"{what}: the rollout engine stayed busy for {self.timeout_s:g} s "
                                 "(rollout.async_wait_timeout_s); the producer is stuck")
        try:
            yield
        finally:
            self.engine_lock.release()

    # -- producer ---------------------------------------------------------------------------------------
    def _may_start(self, step: int) -> bool:
        return self.version >= step - self.k

    def _make(self, step: int) -> Produced:
        """Step ``step``'s batch, made with the engine's current weights (call with the engine lock held)."""
        with self.cond:
            version = self.version
            self.states[step] = self.stream_state()
            in_flight = [self.ready[s] for s in sorted(self.ready)]
        started = time.time()
        if self.advance is not None:
            for produced in in_flight:  # a batch the learner took meanwhile waits for this lock to be finished
                self.advance(produced.value, version)
        value = self.produce(step, version)
        finished = time.time()
        with self.cond:
            self.busy.append((started, finished))
        return Produced(step, value, version, self.states[step], started, finished)

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    step = self.next_step
                    # past the last step it waits for close(): servers it restarted (vllm_pool) die with their
                    # starting thread, so it must outlive the steps the learner still trains
                    while not self.stopping and (step >= self.max_steps or not self._may_start(step)):
                        self.cond.wait()
                    if self.stopping:
                        return
                with self.engine_lock:
                    produced = self._make(step)
                with self.cond:
                    self.ready[step] = produced
                    self.next_step = step + 1
                    self.cond.notify_all()
        except BaseException as exc:  # the learner re-raises it from take()
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def start(self) -> None:
        if self.concurrent and self.thread is None:
            self.thread = threading.Thread(target=self._run, name="r1mm-rollout-producer", daemon=True)
            self.thread.start()

    # -- learner ----------------------------------------------------------------------------------------
    def take(self, step: int) -> Produced:
        """Step ``step``'s batch: made now (interleaved: up to step + K, with the current weights) or waited for
        (concurrent: at most ``timeout_s``; the producer's error is raised here)."""
        t0 = time.time()
        if not self.concurrent:
            while self.next_step <= min(step + self.k, self.max_steps - 1):
                produced = self._make(self.next_step)
                self.ready[self.next_step] = produced
                self.next_step += 1
            produced = self.ready.pop(step)
        else:
            self.start()
            deadline = t0 + self.timeout_s
            with self.cond:
                while step not in self.ready and self.error is None:
                    left = deadline - time.time()
                    if left <= 0:
                        raise RolloutTimeout(f"step {step}: no rollout batch after {self.timeout_s:g} s "
                                             "(rollout.async_wait_timeout_s); the producer is stuck")
                    self.cond.wait(timeout=left)
                if self.error is not None:
                    raise RuntimeError(f"the rollout producer failed before step {step}'s batch") from self.error
                produced = self.ready.pop(step)
        if self.finish is not None:
            with self.engine(f"finishing step {step}'s rollouts"):
                finished = time.time()
                produced.value = self.finish(produced.value, self.version)
                with self.cond:
                    self.busy.append((finished, time.time()))
        self.learner_waits.append((t0, time.time()))  # interleaved: sampling, so not training either
        if not self.version - self.k <= produced.version <= self.version:
            raise RuntimeError(f"step {step} got a batch of version {produced.version} while the learner holds "
                               f"{self.version} and max_staleness is {self.k}")
        return produced

    def push(self, sync: Callable[[], None]) -> None:
        """Hand the learner's new weights to the engine (``sync``), between two of the producer's generate
        calls, and let the producer start the steps the new version allows."""
        t0 = time.time()
        with self.engine(f"weight sync to version {self.version + 1}"):
            waited = time.time()
            sync()
            with self.cond:
                self.version += 1
                self.states = {s: v for s, v in self.states.items() if s >= self.version}
                self.cond.notify_all()
        self.learner_waits.append((t0, waited))

    def data_state(self, steps_done: int) -> dict[str, Any]:
        """The stream's state before step ``steps_done``'s prompts: what a checkpoint after ``steps_done`` steps
        resumes from (later batches in flight are made again)."""
        with self.cond:
            return self.states[steps_done] if steps_done in self.states else self.stream_state()

    def step_metrics(self, step: int, produced: Produced, token_staleness: list[int]) -> dict[str, float]:
        """Staleness: the batch's (its oldest token's), the mean over its tokens and their histogram over 0..K
        (the share of the step's tokens sampled k versions before it; without partial rollouts one bucket holds
        them all); and over the time since the previous step ended, the learner's idle share (waiting for a
        batch or for the engine, or sampling itself when interleaved) and the sampler's (not generating)."""
        now = time.time()
        start, self.last_boundary = self.last_boundary, now
        span = max(now - start, 1e-9)
        with self.cond:
            busy = _overlap(self.busy, start, now)
            self.busy = [s for s in self.busy if s[1] > now]
        waited = _overlap(self.learner_waits, start, now)
        self.learner_waits = [w for w in self.learner_waits if w[1] > now]
        staleness = step - produced.version
        out = {"async/staleness": float(staleness), "async/policy_version": float(produced.version),
               "async/learner_idle_frac": waited / span, "async/sampler_idle_frac": max(0.0, 1.0 - busy / span),
               "async/token_staleness_mean": sum(token_staleness) / max(len(token_staleness), 1)}
        for k in range(self.k + 1):
            out[f"async/staleness_hist/{k}"] = token_staleness.count(k) / max(len(token_staleness), 1)
        return out

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=self.timeout_s)
            if self.thread.is_alive():  # a daemon thread: it cannot keep the process alive
                log.warning("the rollout producer did not stop within %g s; leaving it", self.timeout_s)
            self.thread = None
