"""Rewards that can hang run in a worker process that can be killed.

A Python function stuck in a thread cannot be stopped: a timed-out call went on burning CPU, held
its thread (four of them starved every other reward) and kept the interpreter from exiting. So a
reward placed in a process (``isolation``, see :func:`placement`) runs in a child of its own, a
plain ``python -c`` that calls :func:`serve`. Not multiprocessing: spawn re-imports the caller's main
script (a script without a ``__main__`` guard ran again) and fork copies a trainer holding CUDA
contexts, threads and their locks. The child finds the function by its recipe name (file path, dotted path,
registered or entry-point name), so only the arguments and the values are pickled, never the
function. A call past its limit kills the child and everything it started (it leads its own process
group); a new child starts at once, and its start-up is not counted against the next call's limit.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Any, BinaryIO

from r1_mm.core.plugins import is_plugin_name
from r1_mm.rewards import budget
from r1_mm.rewards.registry import call_reward, get

STARTUP_TIMEOUT_S = 120.0  # importing the reward's module (it may import torch); not counted in any limit
_HEADER = struct.Struct(">Q")
# not ``-m r1_mm.rewards.worker``: runpy would run a second copy of this module as ``__main__``
WORKER_MAIN = "from r1_mm.rewards.worker import serve; serve()"


class WorkerError(RuntimeError):
    """A reward call in a worker that failed; ``index`` names the completion when the reward said which."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class WorkerTimeout(WorkerError):
    """The call ran past its limit; the worker was killed."""


# -- where a reward runs ---------------------------------------------------------------------------

def importable(name: str, source: str) -> bool:
    """Can a fresh process find this reward by its name? Not a Python object handed to the trainer
    (``reward_funcs``) or registered by code the worker never runs (a notebook, a ``__main__``)."""
    return is_plugin_name(name) or source.startswith(("r1_mm.rewards.", "entry point "))


def placement(name: str, source: str, isolation: str, limited: bool) -> str:
    """``"process"`` or ``"inline"`` for a reward spec's ``isolation`` (auto, process, inline).

    auto: user code named by path or entry point runs in a worker when a time limit is set
    (``rewards.timeout_s`` or ``batch_timeout_s``), since only a process can be stopped at a limit;
    built-ins run inline (their parsers are linear-time and ``accuracy``'s math-verify already runs in
    a killable process of its own), and so do Python objects (they may not survive another process).
    Raises ValueError when ``process`` is asked of a reward a worker cannot find.
    """
    if isolation == "inline":
        return "inline"
    if isolation == "process":
        if not importable(name, source):
            raise ValueError(f"isolation=process runs the reward in a worker process that finds it by name, but "
                             f"'{name}' is {source or 'not importable'}; name it by file or module path "
                             "(path/to/file.py:fn, pkg.module:fn), or set isolation: inline")
        return "process"
    user_code = is_plugin_name(name) or source.startswith("entry point ")
    return "process" if limited and user_code else "inline"


# -- framing: 8-byte length, then a pickle ---------------------------------------------------------

def _send(stream: BinaryIO, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exact(fd: int, size: int, until: float | None) -> bytes | None:
    """``size`` bytes from ``fd``; None when ``until`` (monotonic) passes first; b"" at end of file."""
    chunks, got = [], 0
    while got < size:
        wait = None if until is None else max(0.0, until - time.monotonic())
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            return None
        chunk = os.read(fd, min(size - got, 1 << 20))
        if not chunk:
            return b""
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _receive(fd: int, until: float | None) -> tuple[Any, bool]:
    """(message, timed_out); message is None at end of file (the other side is gone)."""
    header = _read_exact(fd, _HEADER.size, until)
    if header is None:
        return None, True
    if not header:
        return None, False
    body = _read_exact(fd, _HEADER.unpack(header)[0], None)  # the rest of a message already being written
    return (pickle.loads(body) if body else None), False


# -- the parent's side -----------------------------------------------------------------------------

class RewardWorker:
    """One reward's worker process: send a call, wait for its values until a limit, kill on overrun.

    Used from one thread at a time (the runner's); every call gets its reply before the next is sent,
    and a call left without a reply (an exception while waiting) kills the worker.
    """

    def __init__(self, name: str, fixed: dict[str, Any]):
        self.name, self.fixed = name, fixed
        self._process: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._pending = False
        self.kills = 0
        self.start()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start a worker; it loads the reward while the caller goes on (see :meth:`ready`)."""
        self._process = subprocess.Popen([sys.executable, "-c", WORKER_MAIN], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, start_new_session=True,
                                         env={**os.environ, "R1MM_REWARD_PARENT": str(os.getpid())})
        self._ready = self._pending = False
        try:
            _send(self._process.stdin, {"name": self.name, "fixed": self.fixed, "sys_path": list(sys.path)})
        except (BrokenPipeError, OSError):
            pass  # it died at once; ready() says so

    def ready(self) -> None:
        """Wait until the worker has loaded its reward (starting one if there is none); raises WorkerError."""
        if self._process is None or self._process.poll() is not None:
            self.kill()
            self.start()
        if self._ready:
            return
        reply, _ = _receive(self._process.stdout.fileno(), time.monotonic() + STARTUP_TIMEOUT_S)
        if not reply or reply[0] != "ready":
            why = reply[1] if reply else f"it did not start within {STARTUP_TIMEOUT_S:g} s or exited"
            self.kill()
            raise WorkerError(f"its worker process could not load it: {why}")
        self._ready = True

    def submit(self, kwargs: dict[str, Any], deadline: float | None) -> None:
        """Send one call; ``deadline`` (monotonic) is what :mod:`r1_mm.rewards.budget` tells the reward."""
        if self._pending:
            self.kill()  # a reply nobody read (the caller was interrupted): the worker's state is unknown
        self.ready()
        try:
            data = pickle.dumps(("call", kwargs, deadline), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise WorkerError(f"its arguments cannot be sent to its worker process ({type(exc).__name__}: {exc}); "
                              "set isolation: inline for this reward") from None
        try:
            self._process.stdin.write(_HEADER.pack(len(data)) + data)
            self._process.stdin.flush()
        except (BrokenPipeError, OSError):
            code = self._process.poll()
            self.kill()
            raise WorkerError(f"its worker process exited (code {code})") from None
        self._pending = True

    def result(self, until: float | None) -> tuple[list[Any], dict[str, float] | None]:
        """(values, the reward's metrics() or None); kills the worker and raises :class:`WorkerTimeout`
        when no reply came by ``until`` (monotonic; None = wait for ever)."""
        reply, timed_out = _receive(self._process.stdout.fileno(), until)
        self._pending = False
        if timed_out:
            self.kill()
            self.start()  # warm up for the next call while the step goes on
            raise WorkerTimeout("killed at its limit")
        if reply is None:
            code = self._process.poll()
            self.kill()
            raise WorkerError(f"its worker process died (exit code {code})")
        if reply[0] == "error":
            raise WorkerError(reply[1], reply[2])
        return reply[1], reply[2]

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (the reward may have started processes of its own)."""
        process, self._process = self._process, None
        self._ready = self._pending = False
        if process is None:
            return
        if process.poll() is None:
            self.kills += 1
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        for stream in (process.stdin, process.stdout):
            with contextlib.suppress(OSError):
                stream.close()

    close = kill

    def __del__(self) -> None:  # a runner dropped without close(): its worker must not live on
        with contextlib.suppress(Exception):
            self.kill()


# -- the worker's side -----------------------------------------------------------------------------

def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the trainer dies (a SIGKILLed trainer cannot clean up)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(os.environ.get("R1MM_REWARD_PARENT", os.getppid())):
        os._exit(1)  # the parent died before prctl took effect


def serve() -> None:
    """Load the reward named in the first message, then answer ("call", kwargs, deadline) messages."""
    _die_with_parent()
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the reward's own prints go to stderr, not into the replies
    requests = sys.stdin.buffer.fileno()
    init, _ = _receive(requests, None)
    if init is None:
        return
    sys.path[:] = init["sys_path"] + [p for p in sys.path if p not in init["sys_path"]]  # the trainer's imports
    try:
        fn = get(init["name"])
    except Exception as exc:
        _send(replies, ("error", f"{type(exc).__name__}: {exc}"))
        return
    _send(replies, ("ready",))
    fixed = init["fixed"]
    while True:
        message, _ = _receive(requests, None)
        if message is None:
            return
        _, kwargs, deadline = message
        try:
            with budget.until(deadline):
                values = call_reward(fn, **{**kwargs, **fixed})
            report = getattr(fn, "metrics", None)
            reply = ("ok", list(values), dict(report()) if callable(report) else None)
            pickle.dumps(reply)  # a value that cannot travel is the reward's error, not the worker's death
        except Exception as exc:
            reply = ("error", f"{type(exc).__name__}: {exc}", getattr(exc, "index", None))
        _send(replies, reply)
