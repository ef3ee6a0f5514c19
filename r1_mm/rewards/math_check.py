"""Math equivalence under a hard time limit.

math-verify's own timeouts rely on ``signal.alarm``, which only works in a process's main thread and
cannot interrupt sympy inside C code; a LaTeX bomb can then hang a whole training step. So the check
runs in a persistent child process: a call that exceeds the limit kills the child (it is restarted on
the next call) and scores as not equivalent. Cheap string equality never leaves this process.

Parses and verdicts are cached (bounded LRU): a group's completions share one solution, and a policy
often writes the same answer many times. A check that was killed at its full limit is remembered as
not equivalent, so a repeated LaTeX bomb costs its limit once. Checks honour the batch's time budget
(:mod:`r1_mm.rewards.budget`): one that no longer fits is not started and scores as not equivalent.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import select
import subprocess
import sys
import threading
from collections import OrderedDict

from r1_mm.rewards import budget

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0  # importing sympy in a fresh process; not counted in the per-call limit
CACHE_SIZE = 4096  # parses kept by the worker, verdicts kept by the checker


def serve() -> None:
    """Worker process: answer one JSON request per line, [prediction, solution, seconds] -> true/false."""
    from math_verify import parse, verify

    verify(parse("$1$"), parse("$1$"))  # math-verify imports its LaTeX parser on first use: not inside a limit
    parse = functools.lru_cache(maxsize=CACHE_SIZE)(parse)  # the same solution comes G times per group
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        prediction, solution, seconds = json.loads(line)
        try:
            gold = parse(solution, parsing_timeout=seconds)
            pred = parse(prediction, parsing_timeout=seconds)
            ok = bool(gold and pred and verify(gold, pred, timeout_seconds=seconds))
        except Exception:  # math-verify raises on pathological input: a wrong answer, not a crash
            ok = False
        out.write("true\n" if ok else "false\n")
        out.flush()


class MathChecker:
    """One worker process serving equivalence checks; thread-safe; counts the calls that timed out.

    The worker is a plain ``python -m r1_mm.rewards.math_check`` subprocess, not a multiprocessing
    child: multiprocessing's spawn re-imports the caller's main script, so calling a reward from a
    script without an ``if __name__ == "__main__"`` guard ran the script again (or failed, from stdin).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        # after the first kill a standby worker imports sympy ahead of time: the next kill swaps it in
        # instead of making the next check wait seconds for a fresh worker's start-up
        self._spare: subprocess.Popen[str] | None = None
        self._ready = False
        self.timeouts = 0
        self.over_budget = 0  # checks not started: the batch's time budget was spent
        self._verdicts: OrderedDict[tuple[str, str], bool] = OrderedDict()

    def _readline(self, seconds: float) -> str | None:
        """A line from the worker, or None when none came within ``seconds``."""
        assert self._process is not None and self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], seconds)
        if not ready:
            return None
        return self._process.stdout.readline()

    def _spawn(self) -> None:
        """Make the standby worker (or a new one) the worker, without waiting for it to be ready."""
        self._process, self._spare = self._spare or self._popen(), None
        self._ready = False

    @staticmethod
    def _popen() -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen([sys.executable, "-m", "r1_mm.rewards.math_check"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)

    def _await_ready(self) -> bool:
        """Is a worker ready to check? Waits for its start-up as long as the batch's budget allows (a
        start-up cut short goes on for the next check); raises when the worker cannot start at all."""
        if self._process is None or self._process.poll() is not None:
            self._kill()
            self._spawn()
        if self._ready:
            return True
        wait = budget.clip(STARTUP_TIMEOUT_S)
        line = self._readline(max(0.0, wait))
        if line is None and wait < STARTUP_TIMEOUT_S:
            return False
        if (line or "").strip() != "ready":
            self._kill()
            raise RuntimeError("the math-verify worker process did not start")
        self._ready = True
        return True

    def _kill(self, process: subprocess.Popen[str] | None = None) -> None:
        """Kill the worker (or ``process``, e.g. the standby) and close its pipes."""
        if process is None:
            process, self._process, self._ready = self._process, None, False
        if process is not None:
            if process.poll() is None:
                process.kill()
            process.wait(5)
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()

    def equivalent(self, prediction: str, solution: str, seconds: float) -> bool:
        """math-verify equivalence, or False when it takes longer than ``seconds`` (hard limit) or than
        the batch's time budget leaves (:func:`r1_mm.rewards.budget.clip`)."""
        key = (prediction, solution)
        with self._lock:
            if key in self._verdicts:
                self._verdicts.move_to_end(key)
                return self._verdicts[key]
            ready = budget.clip(seconds) > 0 and self._await_ready()
            limit = budget.clip(seconds)  # what the worker's start-up left of the budget
            if not ready or limit <= 0:
                self.over_budget += 1
                return False
            killed_before = self.timeouts
            verdict = self._check(prediction, solution, limit)
            killed_at_full_limit = self.timeouts > killed_before and limit >= seconds
            if verdict is not None or killed_at_full_limit:  # a dead worker or a clipped limit: no verdict
                self._verdicts[key] = bool(verdict)
                if len(self._verdicts) > CACHE_SIZE:
                    self._verdicts.popitem(last=False)
            return bool(verdict)

    def _check(self, prediction: str, solution: str, seconds: float) -> bool | None:
        """The worker's answer; None when it was killed at ``seconds`` or died."""
        inner = max(1, int(seconds))
        try:
            self._process.stdin.write(json.dumps([prediction, solution, inner]) + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError):
            self._kill()
            return None
        reply = self._readline(seconds)
        if reply is None:
            self.timeouts += 1
            log.warning("math-verify exceeded %.1f s on answer %.80r; killed, scored 0", seconds, prediction)
            self._kill()
            self._spawn()
            self._spare = self._popen()
            return None
        if not reply:  # the worker died
            self._kill()
            return None
        return reply.strip() == "true"

    def close(self) -> None:
        with self._lock:
            self._kill()
            self._kill(self._spare)
            self._spare = None


_checker: MathChecker | None = None


def checker() -> MathChecker:
    global _checker
    if _checker is None:
        _checker = MathChecker()
        atexit.register(_checker.close)
    return _checker


if __name__ == "__main__":
    serve()
