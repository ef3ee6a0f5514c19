"""GRPO math as pure functions: advantages, the k3 KL estimator, clipped surrogates, loss aggregation.

Pure so they test without a model. Names and definitions follow TRL's GRPOTrainer where both have a
variant (tests assert equal values): loss types grpo / bnpo / dr_grpo / dapo, token- or
sequence-level importance sampling (GSPO), clip-higher (``epsilon_high``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from r1_mm.core.registry import Registry
from r1_mm.rollout.batch import group_grid

STD_EPS = 1e-4  # added to the std before dividing, as TRL does


def nan_std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased std ignoring NaNs (NaN when fewer than two values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1).clamp(min=1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std if dim is None else std.squeeze(dim)


@dataclass
class Advantages:
    values: torch.Tensor  # (N,)
    group_std_zero: torch.Tensor  # (N,) bool: the completion's group had identical rewards


ADVANTAGE_ESTIMATORS: Registry[Callable[..., Advantages]] = Registry("advantage estimator")


def register_advantage(name: str) -> Callable[[Callable[..., Advantages]], Callable[..., Advantages]]:
    """``@register_advantage("name")``: an ``algorithm.advantage_estimator`` (rewards, per-completion group ids, scale -> Advantages)."""
    return ADVANTAGE_ESTIMATORS.register(name)


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, scale: str = "group") -> Advantages:
    """reward - group mean, divided by the group std (``group``), the batch std (``batch``) or 1 (``none``).

    ``group_ids`` (N,): each completion's group (any integers; groups of any size, in any order), as a
    :class:`~r1_mm.rollout.batch.RolloutBatch` carries them. NaN rewards (no reward applied) are left out
    of means and stds and get advantage 0.
    """
    grid, group = group_grid(rewards, group_ids)  # equal groups in order: exactly rewards.view(-1, G)
    mean = torch.nanmean(grid, dim=1)[group]
    group_std = nan_std(grid, dim=1)[group]
    if scale == "batch":
        std = nan_std(rewards).expand_as(rewards)
    elif scale in ("group", "none"):
        std = group_std
    else:
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale!r}")
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + STD_EPS)
    adv = torch.nan_to_num(adv, nan=0.0)
    zero = torch.isclose(torch.nan_to_num(group_std, nan=0.0), torch.zeros_like(group_std))
    return Advantages(values=adv, group_std_zero=zero)


# Outlier guards, the bounds verl uses (verl/trainer/ppo/core_algos.py): one token whose logprob moved
# far (a near-zero-probability sample, a stale engine) must not turn the step's loss into inf or NaN
# (inf * a zero mask entry is NaN too, so even a masked-out token would). TRL has no such guard.
LOG_RATIO_BOUND = 20.0  # |log pi/pi_old| per token before exp (compute_policy_loss_vanilla)
SEQUENCE_LOG_RATIO_MAX = 10.0  # the sequence-level (GSPO) log ratio's upper bound (compute_policy_loss_gspo)
KL_LOG_RATIO_BOUND = 20.0  # |ref - policy| before exp in the k3 estimator (kl_penalty, low_var_kl)
KL_BOUND = 10.0  # the k3 value itself (kl_penalty, low_var_kl)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(r) - r - 1 with r = ref - policy,
    r clamped to +-KL_LOG_RATIO_BOUND and the value to +-KL_BOUND as verl's low_var_kl does
    (identical to TRL's unclamped value inside those bounds)."""
    r = torch.clamp(ref_logps - logps, -KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)
    return torch.clamp(torch.exp(r) - r - 1, -KL_BOUND, KL_BOUND)


@dataclass
class LossSettings:
    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    importance_sampling_level: str = "token"
    max_completion_length: int = 64
    kl_importance_weighting: bool = True  # KL x pi/pi_old (unbiased under off-policy samples)


@dataclass(frozen=True)
class LossNorm:
    """The full step's denominators, so a micro-batch's loss is its exact share of the step's loss
    (gradient accumulation then gives the unaccumulated gradient for every loss type)."""

    sequences: float  # completions in this process's step
    tokens: float  # their scored tokens
    items: float  # dapo: the global batch's scored tokens per process

    @classmethod
    def of(cls, mask: torch.Tensor, num_items: float | None = None) -> LossNorm:
        tokens = float(mask.sum())
        return cls(sequences=float(mask.shape[0]), tokens=tokens, items=tokens if num_items is None else num_items)


# ``algorithm.loss_type``: how per-token losses become the batch's loss (one entry per TRL loss type)
LOSS_AGGREGATORS: Registry[Callable[[torch.Tensor, torch.Tensor, LossSettings, LossNorm], torch.Tensor]] = \
    Registry("loss_type")


@LOSS_AGGREGATORS.register("grpo")
def _agg_grpo(per_token: torch.Tensor, mask: torch.Tensor, s: LossSettings, norm: LossNorm) -> torch.Tensor:
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / max(norm.sequences, 1.0)


@LOSS_AGGREGATORS.register("bnpo")
def _agg_bnpo(per_token: torch.Tensor, mask: torch.Tensor, s: LossSettings, norm: LossNorm) -> torch.Tensor:
    return (per_token * mask).sum() / max(norm.tokens, 1.0)


@LOSS_AGGREGATORS.register("dr_grpo")
def _agg_dr_grpo(per_token: torch.Tensor, mask: torch.Tensor, s: LossSettings, norm: LossNorm) -> torch.Tensor:
    return (per_token * mask).sum() / (max(norm.sequences, 1.0) * s.max_completion_length)


@LOSS_AGGREGATORS.register("dapo")
def _agg_dapo(per_token: torch.Tensor, mask: torch.Tensor, s: LossSettings, norm: LossNorm) -> torch.Tensor:
    """Token-level mean over the whole (global) batch: ``norm.items`` is its token count per process."""
    return (per_token * mask).sum() / max(norm.items, 1.0)


def importance_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """pi / pi_old per token (N, T), or per sequence (N, 1) from the mean token log ratio (GSPO); the log
    ratio clamped to verl's bounds before exp."""
    log_ratio = logps - old_logps
    if level == "sequence":
        mask = mask.to(logps.dtype)
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        return torch.exp(torch.clamp(log_ratio, max=SEQUENCE_LOG_RATIO_MAX))
    if level == "token":
        return torch.exp(torch.clamp(log_ratio, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    raise ValueError(f"importance_sampling_level must be token or sequence, got {level!r}")


@dataclass
class LossOutput:
    loss: torch.Tensor
    per_token_kl: torch.Tensor | None
    clipped_low: torch.Tensor  # (N, T) bool: ratio below 1-eps with negative advantage
    clipped_high: torch.Tensor  # (N, T) bool: ratio above 1+eps_high with positive advantage


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                settings: LossSettings, *, ref_logps: torch.Tensor | None = None,
                num_items: float | None = None, token_weights: torch.Tensor | None = None,
                norm: LossNorm | None = None, kl_logps: torch.Tensor | None = None) -> LossOutput:
    """Clipped surrogate + beta * k3 KL, aggregated by ``settings.loss_type``.

    Log ratios and the KL are clamped to verl's bounds (see LOG_RATIO_BOUND), so outlier tokens give a
    finite loss. A zero-length completion (all-zero mask row) adds 0 to every numerator and counts as
    TRL counts it: one sequence in grpo's mean and dr_grpo's denominator, no tokens in bnpo / dapo.

    ``token_weights`` multiplies the surrogate per token (truncated importance sampling between the
    rollout engine's and the learner's logprobs). ``norm`` holds the whole step's denominators when
    these rows are one micro-batch of it (default: these rows are the step). ``kl_logps``: the policy's
    logprobs under the KL term's convention when it differs from the ratio's (untruncated when sampling
    truncates, see docs/sampling.md; default ``logps``).
    """
    aggregate = LOSS_AGGREGATORS.get(settings.loss_type)  # ValueError naming the known ones
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = importance_ratio(logps, old_logps, mask, settings.importance_sampling_level)
    clipped = torch.clamp(ratio, 1 - settings.epsilon_low, 1 + settings.epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if token_weights is not None:
        per_token = per_token * token_weights
    kl = None
    if settings.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs reference logprobs")
        kl = k3_kl(logps if kl_logps is None else kl_logps, ref_logps)
        weighted_kl = kl * ratio if settings.kl_importance_weighting else kl
        per_token = per_token + settings.beta * weighted_kl
    if norm is None:
        norm = LossNorm.of(mask, num_items)
    loss = aggregate(per_token, mask, settings, norm)
    ratio_full = ratio.expand_as(logps)
    adv_full = adv.expand_as(logps)
    low = (ratio_full < 1 - settings.epsilon_low) & (adv_full < 0) & mask.bool()
    high = (ratio_full > 1 + settings.epsilon_high) & (adv_full > 0) & mask.bool()
    return LossOutput(loss=loss, per_token_kl=kl, clipped_low=low, clipped_high=high)
