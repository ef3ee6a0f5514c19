"""Where judgements come from: an OpenAI-compatible server (vLLM's, by default) or an in-process
transformers model. Both take the same :class:`JudgeRequest` and return the judge's raw text."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import random
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import Any

from PIL import Image

from r1_mm.rewards.registry import run_sync

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeRequest:
    """One judge call: images (or a video's sampled frames, in order), then the prompt text."""

    prompt: str
    images: tuple[Image.Image, ...] = ()
    output_regex: str | None = None  # servers with structured outputs (vLLM) constrain the verdict to it


@dataclass
class RetryPolicy:
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 1.0  # doubled after each failed attempt, with jitter


class CriticBackend(ABC):
    model_id: str = "?"

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    @abstractmethod
    def judge(self, requests: list[JudgeRequest]) -> list[str | None]:
        """The judge's text for every request; None where it failed (after retries)."""

    def close(self) -> None:
        return None


def image_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


_RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAICompatibleCritic(CriticBackend):
    """Chat-completions over HTTP with a concurrency limit, per-request timeouts and retried failures."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, *,
                 max_concurrency: int = 8, retry: RetryPolicy | None = None, max_tokens: int = 256,
                 temperature: float = 0.0):
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.retry = retry or RetryPolicy()
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.model_id = model or self._first_served_model()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _first_served_model(self) -> str:
        import httpx

        try:
            listing = httpx.get(f"{self.base_url}/models", headers=self._headers(), timeout=self.retry.timeout_s)
            listing.raise_for_status()
            return listing.json()["data"][0]["id"]
        except Exception as exc:
            raise ConnectionError(f"critic server at {self.base_url} did not list a model ({exc}); "
                                  "start one with `r1-mm serve critic --model PATH` or set the reward's base_url") from exc

    def _body(self, request: JudgeRequest) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image_data_url(im)}}
                                         for im in request.images]
        content.append({"type": "text", "text": request.prompt})
        body: dict[str, Any] = {"model": self.model_id, "messages": [{"role": "user", "content": content}],
                                "max_tokens": self.max_tokens, "temperature": self.temperature}
        if request.output_regex:
            body["structured_outputs"] = {"regex": request.output_regex}
        return body

    async def _one(self, client: Any, gate: asyncio.Semaphore, request: JudgeRequest) -> str | None:
        import httpx

        delay = self.retry.backoff_s
        for attempt in range(self.retry.retries + 1):
            async with gate:
                try:
                    reply = await client.post(f"{self.base_url}/chat/completions", json=self._body(request),
                                              headers=self._headers(), timeout=self.retry.timeout_s)
                    if reply.status_code == 200:
                        self.counters["requests"] += 1
                        return reply.json()["choices"][0]["message"]["content"] or ""
                    problem = f"HTTP {reply.status_code}: {reply.text[:200]}"
                    retryable = reply.status_code in _RETRYABLE_STATUS
                except (httpx.TimeoutException, httpx.TransportError) as exc:
                    problem, retryable = f"{type(exc).__name__}: {exc}", True
            if not retryable or attempt == self.retry.retries:
                self.counters["request_failures"] += 1
                log.warning("critic request failed after %d attempt(s): %s", attempt + 1, problem)
                return None
            self.counters["retries"] += 1
            await asyncio.sleep(delay * (1 + random.random() * 0.1))
            delay *= 2
        return None

    async def _all(self, requests: list[JudgeRequest]) -> list[str | None]:
        import httpx

        gate = asyncio.Semaphore(self.max_concurrency)
        async with httpx.AsyncClient() as client:
            return list(await asyncio.gather(*(self._one(client, gate, r) for r in requests)))

    def judge(self, requests: list[JudgeRequest]) -> list[str | None]:
        return run_sync(self._all(requests)) if requests else []


class TransformersCritic(CriticBackend):
    """The judge model in this process (greedy decoding, one request at a time). No output constraints."""

    def __init__(self, model_path: str, max_new_tokens: int = 256):
        super().__init__()
        from r1_mm.config.recipe import ModelConfig
        from r1_mm.models.loading import load_model, load_processor

        cfg = ModelConfig(name_or_path=model_path)
        self.model_id = model_path
        self.max_new_tokens = max_new_tokens
        self._processor = load_processor(cfg)
        self._model = load_model(cfg, trainable=False).eval()

    def judge(self, requests: list[JudgeRequest]) -> list[str | None]:
        import torch

        out: list[str | None] = []
        for request in requests:
            content = [{"type": "image"} for _ in request.images] + [{"type": "text", "text": request.prompt}]
            text = self._processor.apply_chat_template([{"role": "user", "content": content}],
                                                       tokenize=False, add_generation_prompt=True)
            inputs = self._processor(text=[text], images=list(request.images) or None, return_tensors="pt")
            with torch.no_grad():
                ids = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            new = ids[0, inputs["input_ids"].shape[1]:]
            out.append(self._processor.tokenizer.decode(new, skip_special_tokens=True))
            self.counters["requests"] += 1
        return out
