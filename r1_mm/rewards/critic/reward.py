"""The ``critic`` reward: an LMM judge scores each completion (pointwise) or compares completions of
the same prompt with each other (pairwise)."""

from __future__ import annotations

from typing import Any

from r1_mm.rewards.critic.judge import _JUDGES, CriticSettings, get_judge
from r1_mm.rewards.parsing import completion_text
from r1_mm.rewards.registry import reward


def question_text(prompt: Any) -> str:
    """The text the user wrote: every text part of every user message (placeholders dropped)."""
    if isinstance(prompt, str):
        return prompt
    parts = []
    for message in prompt or []:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text")
    return "".join(parts).strip()


def prompt_groups(keys: list[Any]) -> list[list[int]]:
    """Indices of consecutive completions that share a prompt (the G samples of one group)."""
    groups: list[list[int]] = []
    for i, key in enumerate(keys):
        if groups and keys[groups[-1][0]] == key:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def pairwise_win_rates(verdicts: dict[tuple[int, int], str | None], n: int) -> list[float | None]:
    """Each completion's mean outcome over its comparisons (win 1, tie 0.5, loss 0); None without any."""
    outcomes: list[list[float]] = [[] for _ in range(n)]
    for (a, b), verdict in verdicts.items():
        if verdict is None:
            continue
        score_a = {"A": 1.0, "B": 0.0, "tie": 0.5}[verdict]
        outcomes[a].append(score_a)
        outcomes[b].append(1.0 - score_a)
    return [sum(o) / len(o) if o else None for o in outcomes]


@reward("critic")
def critic(prompts: list[Any], completions: list[Any], prompt_media: list[Any] | None = None,
           solution: list[Any] | None = None, id: list[Any] | None = None, *, mode: str = "pointwise",
           backend: str = "openai", base_url: str = "http://127.0.0.1:8000/v1", model: str | None = None,
           api_key_env: str | None = None, max_concurrency: int = 8, timeout_s: float = 60.0, retries: int = 3,
           backoff_s: float = 1.0, max_tokens: int = 256, constrain_output: bool = False,
           use_reference: bool = False, cache_path: str | None = None, max_images: int = 16,
           **_: Any) -> list[float | None]:
    """LLaVA-Critic-style judge reward in [0, 1]; None where the judge's verdict could not be read.

    Pairwise: within each prompt's group, completion i is compared with completion i+1 (cyclically,
    alternating which one is shown first); a completion's reward is its win rate.
    """
    settings = CriticSettings(mode=mode, backend=backend, base_url=base_url, model=model, api_key_env=api_key_env,
                              max_concurrency=max_concurrency, timeout_s=timeout_s, retries=retries,
                              backoff_s=backoff_s, max_tokens=max_tokens, constrain_output=constrain_output,
                              use_reference=use_reference, cache_path=cache_path, max_images=max_images)
    judge = get_judge(settings)
    n = len(completions)
    questions = [question_text(p) for p in prompts]
    responses = [completion_text(c) for c in completions]
    media = list(prompt_media) if prompt_media is not None else [None] * n
    references = [str(s) if use_reference and s is not None else None for s in (solution or [None] * n)]
    if mode == "pointwise":
        return judge.score(questions, responses, media, references)
    pairs = []
    for group in prompt_groups(list(id) if id is not None else questions):
        if len(group) < 2:
            continue
        for k, i in enumerate(group):
            j = group[(k + 1) % len(group)]
            if len(group) == 2 and k == 1:
                break  # a group of two has one pair
            pairs.append((i, j) if k % 2 == 0 else (j, i))
    verdicts = judge.compare([questions[a] for a, _ in pairs], [responses[a] for a, _ in pairs],
                             [responses[b] for _, b in pairs], [media[a] for a, _ in pairs],
                             [references[a] for a, _ in pairs])
    return pairwise_win_rates(dict(zip(pairs, verdicts, strict=True)), n)


critic.needs_for = lambda kwargs: {"solution"} if kwargs.get("use_reference") else set()


def critic_metrics() -> dict[str, float]:
    """Counters summed over every judge this process built (requests, cache hits, unparsable, ...)."""
    total: dict[str, float] = {}
    for judge in _JUDGES.values():
        for k, v in judge.metrics().items():
            total[k] = total.get(k, 0.0) + v
    return total


critic.metrics = critic_metrics  # RewardRunner reports these per step
