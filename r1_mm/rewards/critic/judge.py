"""The critic judge: builds judge requests from questions, responses and media, serves them from the
cache or the back-end, and parses the verdicts. Shared by the ``critic`` reward and critic-labelled
preference pairs (iterative DPO)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from r1_mm.rewards.critic import templates
from r1_mm.rewards.critic.backends import (
    CriticBackend,
    JudgeRequest,
    OpenAICompatibleCritic,
    RetryPolicy,
    TransformersCritic,
)
from r1_mm.rewards.critic.cache import JudgementCache, judgement_key


@dataclass(frozen=True)
class CriticSettings:
    """Recipe kwargs of the ``critic`` reward (see docs/reward-plugins.md)."""

    mode: str = "pointwise"  # pointwise: 1-10 score; pairwise: which of two responses is better
    backend: str = "openai"  # openai: an OpenAI-compatible server (`r1-mm serve critic`); transformers
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = None  # served model name (default: the server's first) or the transformers path
    api_key_env: str | None = None  # environment variable holding the server's API key, if it needs one
    max_concurrency: int = 8
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 1.0
    max_tokens: int = 256
    constrain_output: bool = False  # vLLM structured outputs: the verdict line is always parsable
    use_reference: bool = False  # show the row's solution to the judge as a reference answer
    cache_path: str | None = None  # jsonl file that keeps judgements across runs
    max_images: int = 16  # frames beyond this are subsampled evenly before they reach the judge

    def __post_init__(self) -> None:
        if self.mode not in ("pointwise", "pairwise"):
            raise ValueError(f"critic mode must be 'pointwise' or 'pairwise', got {self.mode!r}")
        if self.backend not in ("openai", "transformers"):
            raise ValueError(f"critic backend must be 'openai' or 'transformers', got {self.backend!r}")
        if self.backend == "transformers" and not self.model:
            raise ValueError("critic backend 'transformers' needs model: a path or tiny:... name")


def build_backend(s: CriticSettings) -> CriticBackend:
    if s.backend == "transformers":
        return TransformersCritic(s.model, max_new_tokens=s.max_tokens)
    api_key = os.environ.get(s.api_key_env) if s.api_key_env else None
    return OpenAICompatibleCritic(s.base_url, s.model, api_key, max_concurrency=s.max_concurrency,
                                  retry=RetryPolicy(s.timeout_s, s.retries, s.backoff_s), max_tokens=s.max_tokens)


def judge_images(media: Any, limit: int) -> tuple[Image.Image, ...]:
    """The prompt's images, then each video's sampled frames (evenly thinned to ``limit`` in total)."""
    if media is None:
        return ()
    images = list(getattr(media, "images", []) or [])
    frames = [Image.fromarray(f) for video in getattr(media, "videos", []) or [] for f in video.frames]
    if len(images) + len(frames) > limit and frames:
        keep = max(1, limit - len(images))
        frames = [frames[int(i)] for i in np.linspace(0, len(frames) - 1, keep)]
    return tuple(images + frames)[: max(limit, len(images))]


def media_phrase(media: Any, images: tuple[Image.Image, ...]) -> str:
    videos = getattr(media, "videos", []) or []
    n_frames = len(images) - len(getattr(media, "images", []) or []) if videos else 0
    return templates.media_phrase(len(images) - n_frames, n_frames)


class CriticJudge:
    def __init__(self, settings: CriticSettings, backend: CriticBackend | None = None):
        self.settings = settings
        self.backend = backend or build_backend(settings)
        self.cache = JudgementCache(settings.cache_path)
        self.counters: Counter[str] = Counter()

    def run(self, requests: list[JudgeRequest]) -> list[str | None]:
        """Judge texts, from the cache where possible; failed requests are None and not cached."""
        keys = [judgement_key(self.backend.model_id, r.prompt, r.images, r.output_regex) for r in requests]
        out: list[str | None] = [self.cache.get(k) for k in keys]
        missing = [i for i, text in enumerate(out) if text is None]
        self.counters["cache_hits"] += len(requests) - len(missing)
        for i, text in zip(missing, self.backend.judge([requests[i] for i in missing]), strict=True):
            out[i] = text
            if text is None:
                self.counters["request_failures"] += 1
            else:
                self.cache.put(keys[i], text)
        self.counters["judgements"] += len(requests)
        return out

    def _regex(self, pattern: str) -> str | None:
        return pattern if self.settings.constrain_output else None

    def score(self, questions: list[str], responses: list[str], media: list[Any],
              references: list[str | None]) -> list[float | None]:
        """Pointwise scores in [0, 1]; None (and counted) where the verdict is missing or unparsable."""
        requests = []
        for q, r, m, ref in zip(questions, responses, media, references, strict=True):
            images = judge_images(m, self.settings.max_images)
            prompt = templates.pointwise_prompt(q, r, media=media_phrase(m, images), reference=ref)
            requests.append(JudgeRequest(prompt, images, self._regex(templates.POINTWISE_OUTPUT_REGEX)))
        scores = [templates.parse_score(text) for text in self.run(requests)]
        self.counters["unparsable"] += sum(s is None for s in scores)
        return scores

    def compare(self, questions: list[str], responses_a: list[str], responses_b: list[str], media: list[Any],
                references: list[str | None]) -> list[str | None]:
        """"A", "B" or "tie" per pair; None (and counted) where the verdict is missing or unparsable."""
        requests = []
        for q, a, b, m, ref in zip(questions, responses_a, responses_b, media, references, strict=True):
            images = judge_images(m, self.settings.max_images)
            prompt = templates.pairwise_prompt(q, a, b, media=media_phrase(m, images), reference=ref)
            requests.append(JudgeRequest(prompt, images, self._regex(templates.PAIRWISE_OUTPUT_REGEX)))
        verdicts = [templates.parse_preference(text) for text in self.run(requests)]
        self.counters["unparsable"] += sum(v is None for v in verdicts)
        return verdicts

    def metrics(self) -> dict[str, float]:
        return {**{k: float(v) for k, v in self.counters.items()},
                **{f"backend_{k}": float(v) for k, v in self.backend.counters.items()}}


_JUDGES: dict[CriticSettings, CriticJudge] = {}


def get_judge(settings: CriticSettings) -> CriticJudge:
    """One judge (and one back-end, one cache) per distinct settings in this process."""
    if settings not in _JUDGES:
        _JUDGES[settings] = CriticJudge(settings)
    return _JUDGES[settings]
