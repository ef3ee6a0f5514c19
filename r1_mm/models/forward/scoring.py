"""Per-token logprobs of G completions per prompt, by the grouped forward (default) or the naive one."""

from __future__ import annotations

import torch

from r1_mm.data import Sample
from r1_mm.data.turns import ToolContext
from r1_mm.models.forward import token_scores
from r1_mm.models.forward.grouped import (
    grouped_logprobs,
    naive_batch,
    naive_logprobs,
    pack_groups,
    scored_mask,
)
from r1_mm.models.forward.token_scores import DivergenceTarget, ScoreRequest
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


def _scored_inputs(model: torch.nn.Module, samples: list[Sample], completion_ids: list[list[int]], g: int, pad_id: int,
                   mode: str, contexts: list[ToolContext | None] | None) -> tuple:
    """(model kwargs, flat scored positions, their targets, the scored mask, (N,) -> (B*G, C)) of either forward."""
    device = next(model.parameters()).device
    prompts = [{k: v.to(device) if hasattr(v, "to") else v for k, v in s.inputs.items()} for s in samples]
    if mode == "grouped":
        packed = pack_groups(model, prompts, completion_ids, g, pad_id, contexts)
        return (packed.model_kwargs(model), packed.logits_index, packed.targets, packed.completion_mask,
                packed.to_completion_grid)
    batch = naive_batch(prompts, completion_ids, g, pad_id, contexts)
    keep = batch.scored.bool()
    return (batch.kwargs, batch.positions[keep], batch.completion_ids[keep], batch.scored,
            lambda t: t.new_zeros(keep.shape).masked_scatter(keep, t))


def score_divergence(student: torch.nn.Module, teacher: torch.nn.Module, samples: list[Sample],
                     completion_ids: list[list[int]], g: int, pad_id: int, *, beta: float, temperature: float,
                     mode: str, suppressed_ids: list[int] | None = None,
                     contexts: list[ToolContext | None] | None = None) -> tuple:
    """Per-token divergence (B*G, C) of the student's next-token distribution to the teacher's (``beta`` as
    :class:`DivergenceTarget`), the student's entropy and the scored mask. Each model runs its own forward of
    the same inputs (the grouped one: each prompt and its media once for the G completions); the teacher's,
    without gradient, gives its last hidden states at the scored positions, and the student's head and the
    teacher's meet in tiles (no (tokens x vocabulary) logits)."""
    kwargs, positions, targets, _, _ = _scored_inputs(teacher, samples, completion_ids, g, pad_id, mode, contexts)
    request = ScoreRequest(positions=positions, targets=targets, temperature=temperature, hidden_only=True)
    with torch.no_grad():
        hidden = token_scores.score(teacher, kwargs, request).hidden
    from r1_mm.models.weights import unwrap

    plain_teacher = unwrap(teacher)
    target = DivergenceTarget(hidden=hidden.detach(), head=plain_teacher.get_output_embeddings(),
                              config=plain_teacher.config.get_text_config(), beta=beta)
    kwargs, positions, targets, mask, to_grid = _scored_inputs(student, samples, completion_ids, g, pad_id, mode,
                                                               contexts)
    out = token_scores.score(student, kwargs, ScoreRequest(
        positions=positions, targets=targets, temperature=temperature, suppressed_ids=tuple(suppressed_ids or ()),
        divergence=target))
    return to_grid(out.divergence), to_grid(out.entropy), mask
