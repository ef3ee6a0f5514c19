"""``vllm_pool``: rollouts on N `r1-mm serve rollout` servers, weights pushed after every update.

Each learner rank shards its prompts across the servers and gathers the completions back in order.
Weights reach the servers after every update in one of two ways (``rollout.pool_weight_sync``):
shared memory (rank 0 writes the gathered weights as safetensors buckets under /dev/shm and every
server reloads them in place; same host only) or a broadcast group between learner rank 0 and every
server worker (NCCL on GPU, gloo on CPU; see weight_channel.py). Both are tested here on CPU.
A server that dies is detected on the next request; ``rollout.pool_on_server_failure`` either
restarts it (servers this engine started: same port, current weights) or stops the run naming it.

Tool trajectories go on through :meth:`VLLMPoolEngine.continue_trajectories`: each next turn is one prompt of
token ids with its media placeholders unexpanded (``transport.encode_continuation``), spread over the servers as
``generate`` spreads prompts, and the expanded ids each server's vLLM sampled after are checked equal to the
learner's (prompt ids + trajectory ids), as ``vllm_colocate`` checks its own.

With ``rollout.weight_sync_lora=adapter`` (model.lora) the servers run with vLLM's LoRA support (``--enable-lora``,
the rank slot and tower LoRA ``vllm_colocate`` uses; servers given in rollout.pool_servers are checked for it at start):
the frozen base weights go in once per policy object by the route above (unmerged), and each sync sends only the PEFT
adapter, in the body of ``POST /load_adapter`` (a few MB: no shared memory or broadcast group needed, remote servers
included), which every server loads as a new LoRA version ``policy-v<version>`` (a new LoRA id; the previous version
stays loaded for a rank whose request predates the sync, older ones are removed). Every generate names its adapter and
a server holding neither refuses it (409) rather than sample from other weights. A restarted server gets the base weights' folder and the
current adapter. ``last_sync_bytes`` is what a sync sent (the adapter's tensors, or the full weights).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from r1_mm.config.recipe import ConfigError, RecipeConfig
from r1_mm.core import cpu_cores, topology
from r1_mm.data.prompts import Sample
from r1_mm.data.turns import ToolContext
from r1_mm.models.weights import iter_policy_weights, lora_adapter_of, policy_weight_bytes, save_lora_adapter
from r1_mm.rollout.base import (
    Completion,
    PromptCompletions,
    RolloutEngine,
    SamplingSettings,
    eos_ids,
    media_token_ids,
)
from r1_mm.rollout.servers import ServerProcess, free_port, wait_until_ready
from r1_mm.rollout.shm_segments import WeightSegment
from r1_mm.rollout.transport import encode_continuation, encode_sample
from r1_mm.rollout.vllm_common import (
    check_prompt_ids,
    engine_dtype,
    lora_rank_slot,
    media_limits,
    plan_continuations,
    sampling_kwargs,
)

log = logging.getLogger(__name__)


SERVER_ENGINE_KEYS = ("max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill", "dtype", "seeding", "executor",
                      "workers", "batching", "cpu_cores", "torch_threads")
API_KEY_HINT = "the variable named by rollout.pool_api_key_env to the servers' key"


class ServerDied(RuntimeError):
    """A rollout server stopped answering (connection refused, its process exited, or its health
    says its engine is broken)."""


def checked(reply: httpx.Response, url: str, what: str) -> httpx.Response:
    """A server's reply, or ServerDied when it reports a broken engine (503), or a clear error."""
    if reply.status_code == 503:
        raise ServerDied(f"{url} reports a broken engine: {reply.text[:300]}")
    if reply.status_code != 200:
        raise RuntimeError(f"rollout server {url} refused {what}: HTTP {reply.status_code} {reply.text[:300]}")
    return reply


def server_devices(pool_size: int, tensor_parallel: int, learners_here: int, gpus_here: int) -> list[list[int]]:
    """The GPUs of each server rank 0 starts on its machine: the ones after the learners'.

    Without this every server took device 0 (vLLM's default with tensor parallel 1), where learner
    rank 0 already lives: vLLM refuses to start ("free memory ... less than desired") and a second
    server fails regardless. No GPU here (CPU machines): no devices to hand out."""
    if gpus_here == 0:
        return [[] for _ in range(pool_size)]
    needed = learners_here + pool_size * tensor_parallel
    if needed > gpus_here:
        raise ConfigError(
            f"rollout.pool_size={pool_size} servers x rollout.vllm_tensor_parallel_size={tensor_parallel} need "
            f"{pool_size * tensor_parallel} GPU(s) beside the {learners_here} learner process(es) on this machine, "
            f"which has {gpus_here}: launch fewer learner processes (--num_processes "
            f"{max(gpus_here - pool_size * tensor_parallel, 0)}), a smaller pool, or servers on other machines "
            "(rollout.pool_servers)")
    first = learners_here
    return [list(range(first + i * tensor_parallel, first + (i + 1) * tensor_parallel)) for i in range(pool_size)]


def adapter_sync(cfg: RecipeConfig) -> bool:
    """Whether syncs send the LoRA adapter alone (rollout.weight_sync_lora=adapter with model.lora)."""
    return cfg.model.lora and cfg.rollout.weight_sync_lora == "adapter"


def lora_problem(url: str, health: dict[str, Any], cfg: RecipeConfig) -> str | None:
    """Why a server cannot serve this run's adapter (its /health's ``lora``), or None."""
    lora = health.get("lora")
    if not lora:
        return (f"rollout server {url} runs without LoRA, but rollout.weight_sync_lora=adapter sends it adapters: start "
                f"it with `r1-mm serve rollout --enable-lora --max-lora-rank {lora_rank_slot(cfg.model.lora_r)}"
                f"{' --lora-vision' if cfg.model.lora_vision else ''}`, or use rollout.weight_sync_lora=merged")
    if int(lora.get("max_lora_rank") or 0) < cfg.model.lora_r:
        return (f"rollout server {url} takes LoRA ranks up to {lora.get('max_lora_rank')}, below model.lora_r="
                f"{cfg.model.lora_r}: restart it with --max-lora-rank {lora_rank_slot(cfg.model.lora_r)}")
    if cfg.model.lora_vision and not lora.get("tower_connector_lora"):
        return (f"rollout server {url} serves no LoRA on the vision tower (started without --lora-vision, or vLLM has "
                "no tower LoRA for this model), but model.lora_vision trains vision adapters; use "
                "rollout.weight_sync_lora=merged")
    return None


def learners_on_this_machine() -> int:
    """Learner processes the launcher started on this machine (torchrun/accelerate set LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


class ManagedServer(ServerProcess):
    """A `r1-mm serve rollout` process this engine started (and may restart), on its own GPUs.

    Starting, waiting, restarting and stopping are ``ServerProcess``'s; a restart appends to the same
    log (``rollout-server-<port>.log`` under the run's ``rollout_servers/``)."""

    readiness = "healthy"

    def __init__(self, cfg: RecipeConfig, port: int, log_dir: Path, host: str = "127.0.0.1",
                 devices: list[int] | None = None, dtype: str | None = None, limits: dict[str, int] | None = None,
                 cpus: list[int] | None = None):
        super().__init__(log_dir / f"rollout-server-{port}.log", startup_timeout_s=cfg.rollout.pool_startup_timeout_s,
                         log_mode="a")
        self.cfg, self.port, self.host = cfg, port, host
        self.devices = devices or []
        self.cpus = cpus or None
        self.dtype = dtype or cfg.rollout.vllm_dtype  # the engine passes the learner's (engine_dtype)
        # media per prompt (the engine passes vllm_common.media_limits: room for a video's frames sent as images)
        self.limits = limits or {"image": cfg.rollout.vllm_max_images_per_prompt,
                                 "video": cfg.rollout.vllm_max_videos_per_prompt}

    def environment(self) -> dict[str, str]:
        """The server's environment: its GPUs only, numbered from 0 inside the server; on its own CPU cores
        (rollout.pool_cpu_cores), one thread per core and vLLM's own binding off (it would reserve one of them)."""
        env = dict(os.environ)
        if self.devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in self.devices)
        if self.cpus:
            env["OMP_NUM_THREADS"] = str(len(self.cpus))
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        return env

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"rollout server {self.url}"

    def command(self) -> list[str]:
        r = self.cfg.rollout
        return [sys.executable, "-m", "r1_mm.cli", "serve", "rollout", "--model", self.cfg.model.name_or_path,
                "--host", self.host, "--port", str(self.port), "--dtype", self.dtype, "--max-model-len", str(r.vllm_max_model_len),
                "--max-images", str(self.limits["image"]), "--max-videos", str(self.limits["video"]),
                "--tensor-parallel-size", str(r.vllm_tensor_parallel_size),
                "--data-parallel-size", str(r.vllm_data_parallel_size), "--seed", str(self.cfg.training.seed),
                "--gpu-memory-utilization", str(r.pool_gpu_memory_utilization), "--executor", r.vllm_executor,
                *[arg for flag, value in (("--max-num-batched-tokens", r.vllm_max_num_batched_tokens),
                                          ("--max-num-seqs", r.vllm_max_num_seqs)) if value is not None
                  for arg in (flag, str(value))],
                *([] if r.pool_server_batching else ["--no-batching"]),
                *(["--enable-lora", "--max-lora-rank", str(lora_rank_slot(self.cfg.model.lora_r))]
                  + (["--lora-vision"] if self.cfg.model.lora_vision else []) if adapter_sync(self.cfg) else [])]

    def probe(self) -> bool:
        return health_ok(self.url, auth_headers(self.cfg))


def auth_headers(cfg: RecipeConfig) -> dict[str, str]:
    key = os.environ.get(cfg.rollout.pool_api_key_env)
    return {"Authorization": f"Bearer {key}"} if key else {}


def health_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    """One readiness probe of a rollout server: its /health answers 200; a refused key is an error at once."""
    status = httpx.get(f"{url}/health", timeout=2, headers=headers).status_code
    if status == 401:
        raise RuntimeError(f"rollout server {url} refused the API key: set {API_KEY_HINT}")
    return status == 200


def wait_healthy(url: str, timeout_s: float, headers: dict[str, str] | None = None) -> None:
    """A server started elsewhere (rollout.pool_servers), or one already waited for: until /health answers."""
    wait_until_ready(lambda: health_ok(url, headers), timeout_s, f"rollout server {url}", readiness="healthy")


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist()[1] > 1:
        torch.distributed.barrier()


class VLLMPoolEngine(RolloutEngine):
    name = "vllm_pool"
    samples_from_policy = False
    generates_beside_learner = True  # its own processes: asynchronous rollouts sample while the learner trains

    def __init__(self, model: torch.nn.Module, processor: Any, cfg: RecipeConfig, **_: Any):
        self.cfg = cfg
        r = cfg.rollout
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.suppressed_ids = media_token_ids(model.config)
        self.eos = eos_ids(model, self.tokenizer)  # where a turn ends (ToolRollout reads it to glue tool turns on)
        self.rank, self.world = _dist()
        self.dtype = engine_dtype(r.vllm_dtype, model)
        self.limits = media_limits(cfg, model.config)
        # servers this engine starts run beside rank 0 (which writes the shared-memory copy), on any machine count
        local = all(httpx.URL(u).host in topology.LOOPBACK for u in r.pool_servers)
        self.sync_mode = r.pool_weight_sync if r.pool_weight_sync != "auto" else ("shm" if local else "broadcast")
        if self.sync_mode == "broadcast" and r.pool_on_server_failure == "restart" and not r.pool_servers:
            raise ValueError("rollout.pool_on_server_failure=restart needs rollout.pool_weight_sync=shm: a restarted "
                             "server must reload the current weights, which only the shared-memory copy keeps")
        self.managed: list[ManagedServer] = []
        self.version = 0
        self.adapter_sync = adapter_sync(cfg)
        if r.weight_sync_lora == "adapter" and not cfg.model.lora:
            raise ValueError("rollout.weight_sync_lora=adapter needs model.lora=true")
        self.adapter: str | None = None  # the LoRA adapter every generate names (adapter sync)
        self.adapter_payload: dict[str, Any] | None = None  # its /load_adapter body (rank 0): a restart reloads it
        self.base_loaded: torch.nn.Module | None = None  # adapter sync: whose frozen base weights the servers hold
        self.weights_folder: Path | None = None  # the full weights last written to shared memory (restarts reload it)
        self.full_weight_bytes = policy_weight_bytes(model)
        self.last_sync_bytes = 0
        self.adapter_bytes = 0
        self.last_sync_s = 0.0
        self.restarts = 0
        self.segment = WeightSegment()
        self.weights_root = self.segment.path
        self._unpin: Callable[[], None] | None = None
        self.cpu_layout = self._pin_learner()
        try:
            self._connect(model)
        except BaseException:  # close() never runs for an engine that did not finish starting
            self.close()
            raise

    def _connect(self, model: torch.nn.Module) -> None:
        r = self.cfg.rollout
        urls = [u.rstrip("/").removesuffix("/v1") for u in r.pool_servers]
        if not urls:
            urls = self._start_own_servers() if self.rank == 0 else []
            if self.world > 1:
                shared = [urls]
                torch.distributed.broadcast_object_list(shared, src=0)
                urls = shared[0]
        self.headers = auth_headers(self.cfg)
        for url in urls:
            wait_healthy(url, r.pool_startup_timeout_s, headers=self.headers)
        self.urls = urls
        self.client = httpx.Client(timeout=r.pool_request_timeout_s, headers=self.headers)
        self._check_server_dtypes()
        if self.adapter_sync:  # servers started elsewhere may lack LoRA: refused here, before any sync
            for url in self.urls:
                problem = lora_problem(url, self.client.get(f"{url}/health").json(), self.cfg)
                if problem:
                    raise ConfigError(problem)
        # the servers' context length (their /health; the recipe's for a server too old to say): a continuation's room
        lengths = [self.client.get(f"{url}/health").json().get("max_model_len") for url in self.urls]
        self.max_model_len = min((int(n) if n is not None else r.vllm_max_model_len for n in lengths),
                                 default=r.vllm_max_model_len)
        self.channel = None
        self.update_weights(model)  # the policy may differ from the checkpoint (LoRA, resumed run)

    def _pin_learner(self) -> dict[str, Any] | None:
        """rollout.pool_cpu_cores: the learner processes on the servers' machine take the cores the servers do not
        (the CPU stand-in for servers on GPUs of their own), before any server starts; what each side got."""
        entries = self.cfg.rollout.pool_cpu_cores
        if not entries or topology.current().machine_rank != 0:
            return None
        before = cpu_cores.allowed_cores()
        cores = cpu_cores.learner_cores(entries, before)
        self._unpin = cpu_cores.restorer(before)
        threads = cpu_cores.pin_this_process(cores, learners_on_this_machine())
        log.info("rollout.pool_cpu_cores: learner on core(s) %s with %d torch thread(s); servers on %s",
                 cpu_cores.compact(cores), threads, ", ".join(map(str, entries)))
        return {"learner_cores": cores, "learner_threads": threads,
                "server_cores": [cpu_cores.parse_cores(e) for e in entries]}

    def _start_own_servers(self) -> list[str]:
        """Rank 0 starts them on its machine, listening where every learner rank reaches them."""
        log_dir = Path(self.cfg.training.output_dir) / "rollout_servers"
        log_dir.mkdir(parents=True, exist_ok=True)
        host = topology.own_server_host(self.cfg.rollout.pool_host)
        if host not in topology.LOOPBACK and not os.environ.get(self.cfg.rollout.pool_api_key_env):
            log.warning("rollout servers listen on %s without an API key: set %s to require one", host,
                        self.cfg.rollout.pool_api_key_env)
        r = self.cfg.rollout
        devices = server_devices(r.pool_size, r.vllm_tensor_parallel_size, learners_on_this_machine(),
                                 torch.cuda.device_count() if torch.cuda.is_available() else 0)
        cpus = self.cpu_layout["server_cores"] if self.cpu_layout else [None] * r.pool_size  # as _pin_learner laid out
        self.managed = [ManagedServer(self.cfg, free_port(host), log_dir, host, devices[i], self.dtype, self.limits,
                                      cpus[i]) for i in range(r.pool_size)]
        for server in self.managed:
            server.start(wait=False)  # all start at once, then each is waited for
        for server in self.managed:
            server.wait_ready()
        return [s.url for s in self.managed]

    def _check_server_dtypes(self) -> None:
        """Servers started elsewhere (rollout.pool_servers) chose their own --dtype: say so when it is not
        the learner's, since their logprobs then differ from the learner's by design."""
        for url in self.urls:
            served = self.client.get(f"{url}/health").json().get("dtype")
            if served is not None and self.dtype != "auto" and served != self.dtype:
                log.warning("rollout server %s samples in %s but the learner runs %s: start it with --dtype %s",
                            url, served, self.dtype, self.dtype)

    def info(self) -> dict[str, Any]:
        health = [self.client.get(f"{url}/health").json() for url in self.urls]
        return {"servers": self.urls, "weight_sync": self.sync_mode, "sync_host": getattr(self, "sync_host", None),
                "server_engines": [{k: h.get(k) for k in SERVER_ENGINE_KEYS} for h in health],
                "cpu_layout": self.cpu_layout,
                "weight_sync_lora": self.cfg.rollout.weight_sync_lora if self.cfg.model.lora else None,
                "adapter": self.adapter,
                # what one sync after a step sends (the adapter alone, or the full weights), and a full sync's size
                "sync_bytes": self.adapter_bytes if self.adapter_sync else self.full_weight_bytes,
                "full_sync_bytes": self.full_weight_bytes}

    # -- weights --------------------------------------------------------------------------------
    def _write_weights(self, model: torch.nn.Module, merge_lora: bool = True) -> Path | None:
        """All ranks gather (collective under ZeRO-3); rank 0 writes safetensors buckets to shared memory."""
        from r1_mm.rollout.reload import write_weight_files

        bucket_mb = self.cfg.rollout.weight_sync_bucket_mb
        weights = iter_policy_weights(model, bucket_mb, merge_lora=merge_lora)
        if self.rank != 0:
            for _ in weights:  # the gather is collective: every rank iterates
                pass
            return None
        folder = self.weights_root / f"v{self.version + 1}"
        write_weight_files(weights, folder, bucket_mb)
        return folder

    def _push(self, url: str, folder: Path, version: int) -> None:
        checked(self.client.post(f"{url}/update_weights", json={"path": str(folder), "version": version}), url,
                "a weight update")

    def _open_channel(self) -> Any:
        """Rank 0 forms the broadcast group with every worker of every server (once)."""
        from r1_mm.rollout.weight_channel import WeightChannel

        workers = [int(self.client.get(f"{url}/health").json().get("workers", 1)) for url in self.urls]
        world = 1 + sum(workers)
        host = self.cfg.rollout.pool_sync_host or topology.address_towards(httpx.URL(self.urls[0]).host)
        port = free_port(host)
        offsets = [1 + sum(workers[:i]) for i in range(len(workers))]
        log.info("weight broadcast group: rank 0 at %s:%d, %d server worker(s)", host, port, world - 1)
        with ThreadPoolExecutor(len(self.urls)) as pool:
            joins = [pool.submit(self.client.post, f"{url}/open_weight_channel", json={
                "host": host, "port": port, "world_size": world, "rank_offset": off})
                for url, off in zip(self.urls, offsets, strict=True)]
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
            channel = WeightChannel(host, port, 0, world, device)
            self.sync_host = host
            for join in joins:
                join.result().raise_for_status()
        return channel

    def _broadcast_weights(self, model: torch.nn.Module, merge_lora: bool = True) -> None:
        """All ranks gather (collective under ZeRO-3); rank 0 broadcasts each tensor to every server worker.

        Each collective has a deadline (rollout.pool_sync_timeout_s), and rank 0 stops as soon as a server's
        reply comes back failed, with that server's error: a server failing mid-sync once left rank 0
        blocked in an NCCL broadcast, which has no timeout."""
        from r1_mm.models.weights import policy_weight_specs
        from r1_mm.rollout.weight_channel import Checksum, WeightSyncFailed, checksums_agree

        specs = policy_weight_specs(model)
        timeout_s = self.cfg.rollout.pool_sync_timeout_s
        if self.rank == 0:
            # the handshake: every server says it takes these tensors before any is broadcast
            for url in self.urls:
                checked(self.client.post(f"{url}/prepare_weights_broadcast", json={"specs": specs}), url,
                        "a broadcast weight update")
            if self.channel is None:
                self.channel = self._open_channel()
        pool = ThreadPoolExecutor(len(self.urls)) if self.rank == 0 else None
        sent = Checksum()
        replies: list[Any] = []

        def failed() -> str | None:
            """A server whose reply already came back with an error (it cannot be taking part any more)."""
            for url, reply in zip(self.urls, replies, strict=True):
                if not reply.done():
                    continue
                if reply.exception() is not None:
                    return f"rollout server {url}: {type(reply.exception()).__name__}: {reply.exception()}"
                if reply.result().status_code != 200:
                    return (f"rollout server {url} failed the broadcast weight update: HTTP "
                            f"{reply.result().status_code} {reply.result().text[:300]}")
            return None

        try:
            if pool is not None:
                replies = [pool.submit(self.client.post, f"{url}/update_weights_broadcast",
                                       json={"specs": specs, "version": self.version + 1, "timeout_s": timeout_s})
                           for url in self.urls]
            stream = iter_policy_weights(model, self.cfg.rollout.weight_sync_bucket_mb, merge_lora=merge_lora)
            for i, ((name, tensor), (spec_name, _, _)) in enumerate(zip(stream, specs, strict=True)):
                if self.channel is not None:
                    assert name == spec_name, (name, spec_name)
                    try:
                        sent_tensor = self.channel.broadcast(tensor.to(self.channel.device).contiguous(), timeout_s,
                                                             failed)
                    except WeightSyncFailed as exc:
                        self.channel = None  # aborted: a later sync would open a new group
                        raise WeightSyncFailed(f"broadcast weight sync stopped at tensor {i + 1} of {len(specs)} "
                                               f"({name}): {exc}") from None
                    sent.add(sent_tensor)
            for url, reply in zip(self.urls if replies else [], replies, strict=True):  # replies: rank 0 only
                received = checked(reply.result(), url, "a broadcast weight update").json().get("checksums", [])
                if not received or not all(checksums_agree(sent.value(), c) for c in received):
                    raise RuntimeError(f"rollout server {url} received other weights than were sent (checksums "
                                       f"{received} vs {sent.value()}): the broadcast did not deliver them")
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def update_weights(self, model: torch.nn.Module) -> None:
        t0 = time.perf_counter()
        sent = 0
        if not self.adapter_sync or self.base_loaded is not model:
            # merged: every sync; adapter sync: the frozen base weights (unmerged), once per policy object
            self._send_full(model, merge_lora=not self.adapter_sync)
            sent += self.full_weight_bytes
            self.base_loaded = model if self.adapter_sync else None
        if self.adapter_sync:
            sent += self._send_adapter(model)
        self.version += 1
        _barrier()  # no rank samples before every server holds the new weights
        self.last_sync_s = time.perf_counter() - t0
        self.last_sync_bytes = sent

    def _send_full(self, model: torch.nn.Module, merge_lora: bool) -> None:
        if self.sync_mode == "broadcast":
            self._broadcast_weights(model, merge_lora)
            return
        folder = self._write_weights(model, merge_lora)
        if self.rank == 0:
            assert folder is not None
            version = self.version + 1
            self._on_all(list(range(len(self.urls))), lambda url: self._push(url, folder, version))
            self.weights_folder = folder
            for old in self.weights_root.glob("v*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)  # keep only the current weights (restarts need them)

    def _send_adapter(self, model: torch.nn.Module) -> int:
        """The policy's PEFT adapter to every server as LoRA version ``version + 1`` (rank 0 sends; every rank names
        it from now on); the bytes of its tensors."""
        version = self.version + 1
        _, params = lora_adapter_of(model)  # every rank: a policy rank 0 cannot send is refused on all of them
        if self.rank == 0:
            folder = Path(tempfile.mkdtemp(prefix="r1mm_lora_"))
            try:
                save_lora_adapter(model, folder)
                config = json.loads((folder / "adapter_config.json").read_text())
                data = (folder / "adapter_model.safetensors").read_bytes()
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            self.adapter_payload = {"version": version, "config": config,
                                    "safetensors": base64.b64encode(data).decode("ascii")}
            self._on_all(list(range(len(self.urls))), self._load_adapter)
        self.adapter = f"policy-v{version}"
        self.adapter_bytes = sum(p.numel() * p.element_size() for p in params)
        return self.adapter_bytes

    def _load_adapter(self, url: str) -> None:
        assert self.adapter_payload is not None
        reply = checked(self.client.post(f"{url}/load_adapter", json=self.adapter_payload,
                                         timeout=self.cfg.rollout.pool_sync_timeout_s), url, "an adapter load").json()
        if reply.get("adapter") != f"policy-v{self.adapter_payload['version']}":
            raise RuntimeError(f"rollout server {url} loaded adapter {reply.get('adapter')!r}, not version "
                               f"{self.adapter_payload['version']}")

    # -- failures -------------------------------------------------------------------------------
    def _on_all(self, indices: list[int], fn: Any) -> dict[int, Any]:
        """``fn(url)`` for each server index, concurrently. A dead server gets the failure policy and one
        more try. Recovery runs on this (the calling) thread: a restarted server's death signal is tied
        to the thread that started it, so it must not be a short-lived worker thread."""
        results: dict[int, Any] = {}
        failed: dict[int, Exception] = {}
        with ThreadPoolExecutor(max(1, len(indices))) as pool:
            futures = {i: pool.submit(fn, self.urls[i]) for i in indices}
            for i, future in futures.items():
                try:
                    results[i] = future.result()
                except (httpx.TransportError, ServerDied) as exc:
                    failed[i] = exc
        for i, exc in failed.items():
            self._recover(i, exc)
            results[i] = fn(self.urls[i])
        return results

    def _recover(self, index: int, cause: Exception) -> None:
        url = self.urls[index]
        server = next((s for s in self.managed if s.url == url), None)
        if self.cfg.rollout.pool_on_server_failure == "fail" or server is None:
            why = "rollout.pool_on_server_failure=fail" if self.cfg.rollout.pool_on_server_failure == "fail" else \
                "it was not started by this run, so it cannot be restarted (restart it, or list only servers you manage)"
            raise RuntimeError(f"rollout server {url} died ({type(cause).__name__}: {cause}); {why}") from cause
        log.warning("rollout server %s failed (%s); restarting it with the current weights", url, cause)
        server.restart()
        if self.weights_folder is not None and self.weights_folder.exists():
            self._push(url, self.weights_folder, self.version)
        if self.adapter_payload is not None:  # adapter sync: the current adapter over those base weights
            self._load_adapter(url)
        self.restarts += 1

    # -- generation -----------------------------------------------------------------------------
    def _generate_on(self, url: str, items: list[tuple[int, Sample]], n: int,
                     sampling: SamplingSettings) -> dict[str, Any]:
        body = {"prompts": [encode_sample(s) for _, s in items],
                "sampling": [sampling_kwargs(sampling, n, self.suppressed_ids, i) for i, _ in items]}
        return self._post_generate(url, body, "a generate request")

    def _post_generate(self, url: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        """One /generate, naming the current adapter (adapter sync): the server serves that one or refuses (409)."""
        if self.adapter_sync:
            body = {**body, "adapter": self.adapter}
        reply = checked(self.client.post(f"{url}/generate", json=body), url, what).json()
        if self.adapter_sync and reply.get("adapter") != self.adapter:
            raise RuntimeError(f"rollout server {url} served adapter {reply.get('adapter')!r}, not {self.adapter!r}")
        return reply

    def _completion(self, c: dict[str, Any]) -> Completion:
        return Completion(text=self.tokenizer.decode(c["token_ids"], skip_special_tokens=True), token_ids=c["token_ids"],
                          logprobs=c["logprobs"], truncated=c["finish_reason"] == "length")

    def _revive(self) -> None:
        for server in self.managed:
            if not server.alive():
                self._recover(self.urls.index(server.url), ServerDied("process exited"))

    def _spread(self, count: int, post: Any) -> tuple[dict[int, list[int]], dict[int, Any]]:
        """Prompt ``i`` of ``count`` goes to server ``(i + rank) % servers``; ``post(url, indices)`` sends one
        server's share. The shares and each server's reply, by server index."""
        shards: dict[int, list[int]] = {}
        for i in range(count):
            shards.setdefault((i + self.rank) % len(self.urls), []).append(i)
        url_index = {url: k for k, url in enumerate(self.urls)}
        return shards, self._on_all(sorted(shards), lambda url: post(url, shards[url_index[url]]))

    def generate(self, batch: list[Sample], n: int, sampling: SamplingSettings) -> list[PromptCompletions]:
        self._revive()
        shards, replies = self._spread(len(batch), lambda url, idx: self._generate_on(
            url, [(i, batch[i]) for i in idx], n, sampling))
        results: dict[int, PromptCompletions] = {}
        for k, reply in replies.items():
            for i, out in zip(shards[k], reply["outputs"], strict=True):
                results[i] = PromptCompletions(sample=batch[i], completions=[self._completion(c) for c in out["completions"]],
                                               prompt_token_ids=out["prompt_token_ids"])
        return [results[i] for i in range(len(batch))]

    def continue_trajectory(self, sample: Sample, ids: list[int], context: ToolContext,
                            sampling: SamplingSettings, max_tokens: int) -> Completion:
        """The next model turn of a trajectory (see :meth:`continue_trajectories`)."""
        return self.continue_trajectories([(sample, ids, context, max_tokens)], sampling)[0]

    def continue_trajectories(self, items: list[tuple[Sample, list[int], ToolContext, int]],
                              sampling: SamplingSettings) -> list[Completion]:
        """The next model turn of each trajectory ``(sample, ids, context, max_tokens)``: one prompt of token ids
        with its images unexpanded plus the prompt's media and the tool images each (``encode_continuation``),
        spread over the servers as :meth:`generate` spreads prompts, with ``vllm_colocate``'s seeds. The expanded
        ids each server's vLLM sampled after are checked against the learner's (prompt ids + ``ids``): a mismatch
        raises ``PromptMismatchError``. A trajectory that already fills the servers' context gets an empty
        truncated turn, without a request."""
        planned, out = plan_continuations(items, sampling, self.max_model_len, self.suppressed_ids)
        if not planned:
            return out
        prompts = [encode_continuation(t.sample, t.context, self.tokenizer) for t in planned]
        self._revive()

        def post(url: str, idx: list[int]) -> dict[str, Any]:
            body = {"prompts": [prompts[j] for j in idx], "sampling": [planned[j].params for j in idx]}
            return self._post_generate(url, body, "a continuation request")

        shards, replies = self._spread(len(prompts), post)
        for k, reply in replies.items():
            for j, result in zip(shards[k], reply["outputs"], strict=True):
                check_prompt_ids(result["prompt_token_ids"], planned[j].expected)
                out[planned[j].slot] = self._completion(result["completions"][0])
        return out

    def close(self) -> None:
        for server in self.managed:
            server.stop()
        if getattr(self, "client", None) is not None:
            self.client.close()
        self.segment.remove()
        if self._unpin is not None:  # the process's cores and threads as they were before the pool pinned it
            self._unpin()
            self._unpin = None
