"""Off-policy correction between the rollout engine and the learner.

A vLLM engine samples with its own kernels (and, between syncs, possibly stale weights), so its
logprobs differ from the learner's. Truncated importance sampling reweights each token (or sequence)
by pi_learner_old / pi_sampler, capped; the mask modes drop tokens or sequences whose ratio leaves
[floor, cap] instead. Same modes and meaning as TRL's ``vllm_importance_sampling_mode``.
"""

from __future__ import annotations

import torch

from r1_mm.trainers.losses import LOG_RATIO_BOUND, k3_kl

MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampling_logprobs(per_completion: list[list[float] | None], width: int, device: torch.device) -> torch.Tensor | None:
    """(N, width) zero-padded per-completion logprobs (the sampler's; a served teacher's in distillation), or None
    when one completion has none (an engine that reports no logprobs)."""
    if any(lp is None for lp in per_completion):
        return None
    out = torch.zeros(len(per_completion), width, device=device)
    for i, lp in enumerate(per_completion):
        n = min(len(lp), width)
        out[i, :n] = torch.tensor(lp[:n], device=device)
    return out


def importance_weights(learner_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float, floor: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token weights (N, C) for the surrogate loss, and the mismatch statistics to log."""
    if mode not in MODES or mode == "none":
        raise ValueError(f"rollout_is mode must be one of {', '.join(MODES[1:])}, got {mode!r}")
    m = mask.to(learner_logps.dtype)
    diff = (learner_logps - sampler_logps) * m
    if mode.startswith("sequence"):
        log_ratio = diff.sum(-1, keepdim=True).expand_as(diff)
    else:
        log_ratio = diff
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))  # verl's bound (rollout_corr_helper)
    lo = floor if floor is not None else 0.0
    if mode.endswith("truncate"):
        weights = ratio.clamp(max=cap)
        dropped = torch.zeros_like(ratio, dtype=torch.bool)
    else:
        dropped = (ratio > cap) | (ratio < lo)
        weights = ratio.masked_fill(dropped, 0.0)
    valid = m.bool()
    n = valid.sum().clamp(min=1)
    stats = {
        "rollout/logprob_abs_diff_mean": float(diff.abs().sum() / n),
        "rollout/logprob_abs_diff_max": float(diff.abs().max()) if valid.any() else 0.0,
        # k3 estimate of KL(sampler || learner) per token
        "rollout/sampler_learner_kl": float((k3_kl(diff, torch.zeros_like(diff)) * m).sum() / n),
        "rollout/is_ratio_mean": float((ratio * m).sum() / n),
        "rollout/is_ratio_max": float(ratio[valid].max()) if valid.any() else 1.0,
        "rollout/is_dropped_frac": float((dropped & valid).sum() / n),
    }
    return weights.detach(), stats


def sampler_anchor(learner_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                   weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For a PPO ratio taken against the sampler (``algorithm.grpo.clip_against: sampler``): the old logprobs the
    ratio uses, and the token weights that bound it.

    The old logprobs are the sampler's on scored tokens and the learner's elsewhere (padding keeps a ratio of 1).
    The ratio pi_learner / pi_sampler then already is the importance weight, so ``weights`` (the token modes'
    exp(learner - sampler), capped or masked) are divided by that ratio at the step's start: what multiplies the
    advantage is min(ratio, cap) (truncate) or the ratio where kept, 0 where dropped (mask), never the ratio twice."""
    scored = mask.bool()
    anchor = torch.where(scored, sampler_logps, learner_logps).detach()
    if weights is None:
        return anchor, None
    ratio = torch.exp((learner_logps - anchor).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)).detach()
    return anchor, torch.where(scored, weights / ratio, torch.zeros_like(weights))
