"""Per-token logprobs of G completions per prompt, by the grouped forward (default) or the naive one."""

from __future__ import annotations

import torch

from r1_mm.data import Sample
from r1_mm.trainers.grouped_forward import grouped_logprobs, naive_logprobs, pack_groups, pad_completions


def score_completions(model: torch.nn.Module, samples: list[Sample], completion_ids: list[list[int]], g: int,
                      pad_id: int, *, temperature: float, mode: str, with_entropy: bool = False,
                      suppressed_ids: list[int] | None = None):
    """Per-token logprobs (B*G, C) and completion mask, by the grouped or the naive forward.

    Scored under the rollout engines' distribution: ``suppressed_ids`` are masked as when sampling.
    """
    device = next(model.parameters()).device
    prompts = [{k: v.to(device) if hasattr(v, "to") else v for k, v in s.inputs.items()} for s in samples]
    if mode == "grouped":
        packed = pack_groups(model, prompts, completion_ids, g, pad_id)
        logps, entropy = grouped_logprobs(model, packed, temperature=temperature, with_entropy=with_entropy,
                                          suppressed_ids=suppressed_ids)
        return logps, entropy, packed.completion_mask
    logps, entropy = naive_logprobs(model, prompts, completion_ids, g, pad_id, temperature=temperature,
                                    with_entropy=with_entropy, suppressed_ids=suppressed_ids)
    return logps, entropy, pad_completions(completion_ids, pad_id, device)[1]
