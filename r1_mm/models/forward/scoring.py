"""Per-token logprobs of G completions per prompt, by the grouped forward (default) or the naive one."""

from __future__ import annotations

import torch

from r1_mm.data import Sample
from r1_mm.data.turns import ToolContext
from r1_mm.models.forward.grouped import grouped_logprobs, naive_logprobs, pack_groups, scored_mask
from r1_mm.models.forward.truncated_scores import Truncation


def score_completions(model: torch.nn.Module, samples: list[Sample], completion_ids: list[list[int]], g: int,
                      pad_id: int, *, temperature: float, mode: str, with_entropy: bool = False,
                      suppressed_ids: list[int] | None = None, truncation: Truncation | None = None,
                      with_full_logps: bool = False, contexts: list[ToolContext | None] | None = None) -> tuple:
    """Per-token logprobs (B*G, C), entropy (or None) and the mask of the scored tokens, by the grouped or the
    naive forward; with ``with_full_logps`` the untruncated logprobs come fourth. ``contexts``: per completion,
    the tool turns of a multi-turn trajectory (None: single-turn); only model-sampled tokens are scored.

    Scored under the rollout engines' distribution: ``suppressed_ids`` are masked as when sampling and
    ``truncation`` (the sampler's top-p / top-k) renormalises over the tokens the sampler could pick.
    """
    device = next(model.parameters()).device
    prompts = [{k: v.to(device) if hasattr(v, "to") else v for k, v in s.inputs.items()} for s in samples]
    options = dict(temperature=temperature, with_entropy=with_entropy, suppressed_ids=suppressed_ids,
                   truncation=truncation, with_full_logps=with_full_logps)
    if mode == "grouped":
        packed = pack_groups(model, prompts, completion_ids, g, pad_id, contexts)
        logps, entropy, *full = grouped_logprobs(model, packed, **options)
        return (logps, entropy, packed.completion_mask, *full)
    logps, entropy, *full = naive_logprobs(model, prompts, completion_ids, g, pad_id, contexts=contexts, **options)
    mask = scored_mask(completion_ids, list(contexts) if contexts is not None else [None] * len(completion_ids), device)
    return (logps, entropy, mask, *full)
