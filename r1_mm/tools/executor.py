"""Running a batch's tool calls: concurrently, each under a deadline, every failure turned into a text
the model reads and a count the run logs.

Why threads: tools are mostly I/O and image work (PIL and PyAV release the GIL), and their results are
PIL images that a process pool would have to pickle back. Why a failure never raises: an agentic run makes
thousands of calls; an unknown tool, a wrong argument, a tool that raises or hangs is the policy's mistake
(or the tool's) to learn from or to report, not a reason to lose the step. A timed-out call's thread
cannot be killed; it is abandoned (its result is dropped) and the pool is not waited for.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from r1_mm.tools.base import Tool, ToolArgumentError, ToolCall, ToolMedia, ToolResult

POLL_S = 0.02  # how often the waiting thread checks the running calls' deadlines
OUTCOMES = ("ok", "parse_error", "unknown_tool", "bad_arguments", "raised", "timeout")


@dataclass
class ToolOutcome:
    """One call's result, or why it has none. ``result.text`` is what the model reads either way."""

    call: ToolCall | None  # None for a call that could not be parsed
    status: str  # one of OUTCOMES
    result: ToolResult
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def error_result(message: str) -> ToolResult:
    return ToolResult(text=f"Error: {message}")


def parse_failure(message: str) -> ToolOutcome:
    return ToolOutcome(call=None, status="parse_error", result=error_result(message))


class ToolExecutor:
    """The recipe's tools, and a thread pool that runs calls with a per-call timeout."""

    def __init__(self, tools: Mapping[str, Tool], *, timeout_s: float = 30.0, workers: int = 8):
        self.tools = dict(tools)
        self.timeout_s = timeout_s
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="r1mm-tool")
        self.counts: Counter[str] = Counter()

    def schemas(self) -> list[dict]:
        """The tools as the chat template shows them to the model."""
        return [t.schema() for t in self.tools.values()]

    def _run_one(self, call: ToolCall, media: ToolMedia, started: dict[int, float], key: int) -> ToolOutcome:
        started[key] = start = time.perf_counter()
        tool = self.tools[call.name]
        try:
            result = tool(media, call.arguments)
            status = "ok"
        except ToolArgumentError as exc:
            result, status = error_result(str(exc)), "bad_arguments"
        except Exception as exc:
            result, status = error_result(f"{call.name} failed: {type(exc).__name__}: {exc}"), "raised"
        return ToolOutcome(call=call, status=status, result=result, seconds=time.perf_counter() - start)

    def run(self, calls: Sequence[tuple[ToolCall, ToolMedia]]) -> list[ToolOutcome]:
        """The outcomes of ``calls`` (each with its row's media), in order, all submitted at once. Each call's
        deadline counts from when it starts; a call still queued ``timeout_s`` after submission (every worker
        held by hung calls) times out too, so this always returns."""
        outcomes: list[ToolOutcome | None] = [None] * len(calls)
        futures: dict[int, concurrent.futures.Future] = {}
        started: dict[int, float] = {}
        submitted = time.perf_counter()
        for i, (call, media) in enumerate(calls):
            if call.name not in self.tools:
                known = ", ".join(sorted(self.tools)) or "none"
                outcomes[i] = ToolOutcome(call, "unknown_tool", error_result(
                    f"unknown tool '{call.name}'; the tools are: {known}"))
            else:
                futures[i] = self.pool.submit(self._run_one, call, media, started, i)
        pending = dict(futures)
        while pending:
            concurrent.futures.wait(list(pending.values()), timeout=POLL_S,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
            now = time.perf_counter()
            for i, future in list(pending.items()):
                if future.done():
                    outcomes[i] = future.result()
                elif now - started.get(i, submitted) > self.timeout_s:
                    future.cancel()  # a queued call is dropped; a running one is abandoned
                    name = calls[i][0].name
                    outcomes[i] = ToolOutcome(calls[i][0], "timeout", error_result(
                        f"{name} took longer than {self.timeout_s:g} s and was stopped"), self.timeout_s)
                else:
                    continue
                del pending[i]
        done = [o for o in outcomes if o is not None]
        self.counts.update(o.status for o in done)
        return done

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
