"""Math equivalence under a hard time limit.

math-verify's own timeouts rely on ``signal.alarm``, which only works in a process's main thread and
cannot interrupt sympy inside C code; a LaTeX bomb can then hang a whole training step. So the check
runs in a persistent child process: a call that exceeds the limit kills the child (it is restarted on
the next call) and scores as not equivalent. Cheap string equality never leaves this process.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import threading
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0  # importing sympy in a fresh process; not counted in the per-call limit


def _serve(conn: Connection) -> None:
    """Child process: answer (prediction, solution, seconds) requests with True/False until closed."""
    from math_verify import parse, verify

    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        prediction, solution, seconds = request
        try:
            gold = parse(solution, parsing_timeout=seconds)
            pred = parse(prediction, parsing_timeout=seconds)
            ok = bool(gold and pred and verify(gold, pred, timeout_seconds=seconds))
        except Exception:  # math-verify raises on pathological input: a wrong answer, not a crash
            ok = False
        conn.send(ok)


class MathChecker:
    """One child process serving equivalence checks; thread-safe; counts the calls that timed out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: Any = None
        self._conn: Connection | None = None
        self.timeouts = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # no fork: the parent holds torch threads and maybe CUDA
        parent, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child,), daemon=True, name="r1mm-math-verify")
        self._process.start()
        child.close()
        if not parent.poll(STARTUP_TIMEOUT_S) or parent.recv() != "ready":
            self._kill()
            raise RuntimeError("the math-verify worker process did not start")
        self._conn = parent

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._process = None
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def equivalent(self, prediction: str, solution: str, seconds: float) -> bool:
        """math-verify equivalence, or False when it takes longer than ``seconds`` (hard limit)."""
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._start()
            inner = max(1, int(seconds))
            self._conn.send((prediction, solution, inner))
            if self._conn.poll(seconds):
                try:
                    return bool(self._conn.recv())
                except EOFError:
                    self._kill()
                    return False
            self.timeouts += 1
            log.warning("math-verify exceeded %.1f s on answer %.80r; killed, scored 0", seconds, prediction)
            self._kill()
            return False

    def close(self) -> None:
        with self._lock:
            self._kill()


_checker: MathChecker | None = None


def checker() -> MathChecker:
    global _checker
    if _checker is None:
        _checker = MathChecker()
        atexit.register(_checker.close)
    return _checker
