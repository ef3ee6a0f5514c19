"""A distillation teacher served by vLLM (``algorithm.distill.teacher_engine: vllm``): the client of ``POST /score``.

The teacher runs in ``r1-mm serve rollout`` servers, either given by URL (``algorithm.distill.teacher_servers``) or
one this run starts beside the learner from ``algorithm.distill.teacher`` (the vllm_pool engine's
``ManagedServer``, on the teacher's weights and dtype, its log under ``<output_dir>/teacher_servers``). One learner
process for now: more are refused before any server starts (not verified across ranks). Each step, the learner
sends its prompts (as the pool sends them to ``/generate``: text and raw media arrays) with the student's
completions, spread over the servers, and gets back the teacher's logprob of every completion token
(``server.py``'s ``score``: vLLM's ``prompt_logprobs``, the raw model's log-softmax at temperature 1).

Checked before the first step: every server's tokenizer is the student's (``/health``'s fingerprint, the vocabulary
and EOS / BOS ids). Checked on every reply: the prompt ids the teacher's vLLM expanded are the learner's, and one
logprob came back per completion token. A server that fails stops the run, naming it (no restart: a teacher
server holds no state the run could not give a new one, but nothing restarts it yet).

What differs from a local teacher (``teacher_engine: local``): the served logprobs are normalised over the teacher's
whole vocabulary, including the media placeholder tokens the learner suppresses and the head rows past the student's
vocabulary; the local teacher's distribution leaves both out. The difference is log of the teacher's mass on those
tokens at that position, the same for every token there: it shifts the reverse-KL estimate by that (tiny, for a
trained teacher) amount and leaves the estimator's expected gradient unchanged (``distill_losses.sampled_reverse_kl``).
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from r1_mm.config.recipe import ConfigError, RecipeConfig, teacher_model_config
from r1_mm.core import topology
from r1_mm.data import Sample
from r1_mm.rollout.servers import free_port
from r1_mm.rollout.transport import encode_sample, tokenizer_fingerprint
from r1_mm.rollout.vllm_common import PromptMismatchError, check_prompt_ids, learner_ids
from r1_mm.rollout.vllm_pool import (
    ManagedServer,
    _dist,
    auth_headers,
    checked,
    learners_on_this_machine,
    server_devices,
    wait_healthy,
)

log = logging.getLogger(__name__)


class TeacherServer(ManagedServer):
    """An ``r1-mm serve rollout`` of the teacher this run starts (the pool's server, on the teacher's weights)."""

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"teacher server {self.url}"


def teacher_server_config(cfg: RecipeConfig) -> RecipeConfig:
    """The recipe a teacher server is started from: the teacher as its model (no LoRA), the run's vllm_* sizes."""
    return dataclasses.replace(cfg, model=teacher_model_config(cfg))


class ServedTeacher:
    """The teacher's servers; :meth:`score` gives the teacher's logprob of every completion token."""

    def __init__(self, cfg: RecipeConfig, student_tokenizer: Any):
        self.cfg = cfg
        d, r = cfg.algorithm.distill, cfg.rollout
        self.rank, _ = _dist()  # one learner process: more are refused by preflight, before the model loads
        self.managed: list[TeacherServer] = []
        self.client: httpx.Client | None = None
        try:
            urls = [u.rstrip("/").removesuffix("/v1") for u in d.teacher_servers]
            want = tokenizer_fingerprint(student_tokenizer)
            if not urls:
                self._check_tokenizer(want)  # before a server starts for nothing
                urls = self._start_own_server()
            headers = auth_headers(cfg)
            for url in urls:
                wait_healthy(url, r.pool_startup_timeout_s, headers=headers)
            self.urls = urls
            self.client = httpx.Client(timeout=r.pool_request_timeout_s, headers=headers)
            for url in urls:
                health = self.client.get(f"{url}/health").json()
                if health.get("tokenizer") != want:
                    raise ConfigError(
                        f"teacher server {url} ({health.get('model')}): its tokenizer is not the student's (fingerprint "
                        f"{health.get('tokenizer')} vs {want}; none: a server without /score); distillation compares "
                        "the two models token id by token id")
        except BaseException:
            self.close()
            raise

    def _check_tokenizer(self, want: str) -> None:
        """The teacher's own tokenizer (its processor, no weights) against the student's fingerprint."""
        from r1_mm.models.loading import load_processor

        tcfg = teacher_model_config(self.cfg)
        got = tokenizer_fingerprint(load_processor(tcfg))
        if got != want:
            raise ConfigError(f"algorithm.distill.teacher {tcfg.name_or_path}: its tokenizer is not the student's "
                              f"(fingerprint {got} vs {want}); distillation compares the two models token id by token id")

    def _start_own_server(self) -> list[str]:
        cfg = self.cfg
        d, r = cfg.algorithm.distill, cfg.rollout
        log_dir = Path(cfg.training.output_dir) / "teacher_servers"
        log_dir.mkdir(parents=True, exist_ok=True)
        host = topology.own_server_host(r.pool_host)
        # after the learners' GPUs and those of the rollout servers the vllm_pool engine starts on this machine
        pool = r.pool_size if r.engine == "vllm_pool" and not r.pool_servers else 0
        devices = server_devices(pool + 1, r.vllm_tensor_parallel_size, learners_on_this_machine(),
                                 torch.cuda.device_count() if torch.cuda.is_available() else 0)[-1]
        server = TeacherServer(teacher_server_config(cfg), free_port(host), log_dir, host, devices,
                               d.teacher_dtype or cfg.model.dtype)
        self.managed.append(server)
        server.start()
        return [server.url]

    def info(self) -> dict[str, Any]:
        assert self.client is not None
        health = [self.client.get(f"{url}/health").json() for url in self.urls]
        return {"teacher_servers": self.urls, "teacher_models": [h.get("model") for h in health],
                "teacher_server_dtypes": [h.get("dtype") for h in health]}

    def _score_on(self, url: str, items: list[tuple[Sample, list[list[int]]]]) -> list[dict[str, Any]]:
        assert self.client is not None
        body = {"prompts": [encode_sample(s) for s, _ in items], "completions": [ids for _, ids in items]}
        reply = checked(self.client.post(f"{url}/score", json=body), url, "a score request").json()
        return reply["outputs"]

    def score(self, samples: list[Sample], completions: list[list[list[int]]]) -> list[list[list[float]]]:
        """Per prompt, per completion, the teacher's logprob of each token (an empty completion: an empty list).
        Prompt ``i`` goes to server ``(i + rank) % servers``, all servers at once."""
        shards: dict[int, list[int]] = {}
        for i, group in enumerate(completions):
            if any(group):
                shards.setdefault((i + self.rank) % len(self.urls), []).append(i)
        out: list[list[list[float]]] = [[[] for _ in group] for group in completions]
        if not shards:
            return out
        with ThreadPoolExecutor(len(shards)) as pool:
            futures = {k: pool.submit(self._score_on, self.urls[k],
                                      [(samples[i], [c for c in completions[i] if c]) for i in idx])
                       for k, idx in shards.items()}
            replies = {k: f.result() for k, f in futures.items()}
        for k, idx in shards.items():
            for i, reply in zip(idx, replies[k], strict=True):
                try:
                    check_prompt_ids(reply["prompt_token_ids"], learner_ids(samples[i], []))
                except PromptMismatchError as exc:
                    raise PromptMismatchError(f"teacher server {self.urls[k]}, prompt {samples[i].row_id}: the "
                                              f"teacher would score another prompt than the student's ({exc})") from None
                scored = iter(reply["completions"])
                for j, ids in enumerate(completions[i]):
                    if not ids:
                        continue
                    logps = next(scored)["logprobs"]
                    if len(logps) != len(ids):
                        raise RuntimeError(f"teacher server {self.urls[k]} returned {len(logps)} logprobs for a "
                                           f"completion of {len(ids)} tokens")
                    out[i][j] = logps
        return out

    def close(self) -> None:
        for server in self.managed:
            server.stop()
        if self.client is not None:
            self.client.close()
            self.client = None
