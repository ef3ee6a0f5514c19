"""GRPO math as pure functions: advantages, the k3 KL estimator, policy surrogates, loss aggregation,
entropy control.

Pure so they test without a model. Names and definitions follow TRL's GRPOTrainer where both have a
variant (tests assert equal values): loss types grpo / bnpo / dr_grpo / dapo (PPO's clipped surrogate),
cispo (MiniMax-M1) and sapo (soft gate), token- or sequence-level importance sampling (GSPO),
clip-higher (``epsilon_high``), ``top_entropy_quantile`` and ``entropy_coef``. gmpo (geometric mean of
the token ratios) follows verl's ``compute_policy_loss_geo_mean`` (TRL has none).

A loss type (``algorithm.grpo.loss_type``) is a registry entry: a per-token surrogate and an aggregator
(:data:`LOSS_TYPES`, :func:`register_loss_type`).
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
    sapo_temperature_pos: float = 1.0  # sapo: the gate's temperature where the advantage is > 0
    sapo_temperature_neg: float = 1.05  # sapo: ... where it is <= 0
    entropy_coef: float = 0.0  # loss -= entropy_coef x mean entropy of the trained tokens
    top_entropy_quantile: float = 1.0  # only the top share of tokens by entropy get the policy term; 1 = all


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


# How per-token losses become the batch's loss (TRL's normalisations; each loss type names one)
Aggregator = Callable[[torch.Tensor, torch.Tensor, LossSettings, LossNorm], torch.Tensor]


def sequence_mean(per_token: torch.Tensor, mask: torch.Tensor, s: LossSettings, norm: LossNorm) -> torch.Tensor:
    """grpo: each completion's token mean, averaged over completions (verl's seq-mean-token-mean)."""
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / max(norm.sequences, 1.0)


def batch_token_mean(per_token: torch.Tensor, mask: torch.Tensor, s: LossSettings, norm: LossNorm) -> torch.Tensor:
    """bnpo: the mean over this process's tokens."""
    return (per_token * mask).sum() / max(norm.tokens, 1.0)


def constant_length_mean(per_token: torch.Tensor, mask: torch.Tensor, s: LossSettings, norm: LossNorm) -> torch.Tensor:
    """dr_grpo: the token sum over completions x max_completion_length."""
    return (per_token * mask).sum() / (max(norm.sequences, 1.0) * s.max_completion_length)


def global_token_mean(per_token: torch.Tensor, mask: torch.Tensor, s: LossSettings, norm: LossNorm) -> torch.Tensor:
    """dapo: token-level mean over the whole (global) batch: ``norm.items`` is its token count per process."""
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
class Surrogate:
    """A loss type's policy term per token (the rollout correction's weights applied; before the entropy
    mask and the KL term), and which tokens its clipping acted on (the train/clip_ratio_* metrics)."""

    per_token: torch.Tensor  # (N, T), or (N, 1) broadcast over the tokens
    clipped_low: torch.Tensor  # (N, T) bool
    clipped_high: torch.Tensor  # (N, T) bool


# (logps, old_logps, ratio, advantages, mask, settings, token_weights) -> Surrogate; ratio is importance_ratio's
# (N, T) or (N, 1); token_weights (N, T) or None: the rollout correction's importance weights, which the surrogate
# applies (per token, or as its sequence ratio needs them)
SurrogateFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LossSettings,
                        torch.Tensor | None], Surrogate]


def _weighted(per_token: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    return per_token if token_weights is None else per_token * token_weights


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, ratio: torch.Tensor, adv: torch.Tensor,
                      mask: torch.Tensor, s: LossSettings, token_weights: torch.Tensor | None = None) -> Surrogate:
    """PPO's clipped surrogate: -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A) (TRL's grpo / bnpo /
    dr_grpo / dapo). A token is clipped where the clip takes the gradient away: r below 1 - epsilon_low with
    A < 0, or above 1 + epsilon_high with A > 0."""
    clipped = torch.clamp(ratio, 1 - s.epsilon_low, 1 + s.epsilon_high)
    per_token = _weighted(-torch.min(ratio * adv, clipped * adv), token_weights)
    r, a, m = ratio.expand_as(logps), adv.expand_as(logps), mask.bool()
    return Surrogate(per_token, clipped_low=(r < 1 - s.epsilon_low) & (a < 0) & m,
                     clipped_high=(r > 1 + s.epsilon_high) & (a > 0) & m)


def cispo_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, ratio: torch.Tensor, adv: torch.Tensor,
                    mask: torch.Tensor, s: LossSettings, token_weights: torch.Tensor | None = None) -> Surrogate:
    """CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4-5): -sg(clip(r, 1 - epsilon_low, 1 + epsilon_high)) A log pi.

    The clipped importance weight carries no gradient, so every token keeps its gradient A w d(log pi)
    (PPO's clip drops it). Two-sided as the paper writes it and as verl's compute_policy_loss_cispo
    computes it; MiniMax-M1 trained with no lower bound (epsilon >= 1: the floor 1 - epsilon is <= 0) and
    so does TRL, whose ``epsilon_high`` is the cap itself (TRL's epsilon_high = 1 + ours). A token is
    clipped where its weight was capped or floored, whatever its advantage's sign (verl's pg_clipfrac)."""
    weight = torch.clamp(ratio, 1 - s.epsilon_low, 1 + s.epsilon_high).detach()
    per_token = -weight * adv * torch.where(mask.bool(), logps, 0.0)  # padding never reaches the loss, even as NaN
    per_token = _weighted(per_token, token_weights)
    r, m = ratio.expand_as(logps), mask.bool()
    return Surrogate(per_token, clipped_low=(r < 1 - s.epsilon_low) & m, clipped_high=(r > 1 + s.epsilon_high) & m)


def sapo_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, ratio: torch.Tensor, adv: torch.Tensor,
                   mask: torch.Tensor, s: LossSettings, token_weights: torch.Tensor | None = None) -> Surrogate:
    """SAPO (Soft Adaptive Policy Optimization, Qwen, arXiv 2511.20347): -f(r) A with the soft gate
    f(r) = sigmoid(tau (r - 1)) 4 / tau in place of the hard clip; tau = sapo_temperature_pos where A > 0,
    sapo_temperature_neg elsewhere. At r = 1 the gate's slope is 1 (the plain policy gradient); away from
    1 the gradient decays smoothly instead of vanishing at a boundary. As TRL's and verl's sapo compute it
    (verl: compute_policy_loss_sapo). Nothing is clipped."""
    pos = torch.tensor(s.sapo_temperature_pos, dtype=ratio.dtype, device=ratio.device)
    neg = torch.tensor(s.sapo_temperature_neg, dtype=ratio.dtype, device=ratio.device)
    tau = torch.where(adv > 0, pos, neg)
    per_token = _weighted(-torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv, token_weights)
    none = torch.zeros_like(mask, dtype=torch.bool)
    return Surrogate(per_token, clipped_low=none, clipped_high=none)


def gmpo_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, ratio: torch.Tensor, adv: torch.Tensor,
                   mask: torch.Tensor, s: LossSettings, token_weights: torch.Tensor | None = None) -> Surrogate:
    """GMPO (Geometric-Mean Policy Optimization, arXiv 2507.20673, eq. 6): per completion
    -A (prod_t min(r_t A, clip(r_t) A)^(1/|o|)) sgn(A), i.e. -A exp(mean_t of the token log ratios, each
    clipped to [-epsilon_low, epsilon_high] on the side sgn(A) would profit from), as verl's
    compute_policy_loss_geo_mean computes it (the bounds are log-ratio bounds: the paper uses 0.4). The
    token log ratios are first bounded to +-LOG_RATIO_BOUND like every other loss's (verl has that clamp
    commented out; equal inside it). The completion's value is spread over its tokens, so the grpo
    aggregation (token mean per completion, mean over completions) gives verl's mean over completions.
    Token advantages (N, T) are averaged per completion, as verl does; the rollout correction's token
    weights enter as their geometric mean per completion (verl: log(w + 1e-10), so a token the mask mode
    zeroes all but drops its completion). With top_entropy_quantile < 1 the completion's value is kept on
    its high-entropy tokens only, i.e. scaled by their share of its tokens."""
    if s.importance_sampling_level != "token":
        raise ValueError("loss_type gmpo takes its own sequence ratio (the geometric mean of the token ratios): "
                         "importance_sampling_level must be token")
    m = mask.to(logps.dtype)
    n = m.sum(-1).clamp(min=1.0)
    seq_adv = adv[:, 0] if adv.shape[-1] == 1 else (adv * m).sum(-1) / n
    sign = torch.sign(seq_adv)[:, None]
    log_ratio = torch.clamp(logps - old_logps, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    bounded = torch.clamp(log_ratio, -s.epsilon_low, s.epsilon_high)
    kept = sign * torch.min(sign * log_ratio, sign * bounded)
    seq_ratio = torch.exp((kept * m).sum(-1) / n)
    per_seq = -seq_adv * seq_ratio
    if token_weights is not None:
        log_w = torch.log(token_weights.expand_as(logps) + 1e-10)
        per_seq = per_seq * torch.exp((log_w * m).sum(-1) / n)
    per_token = per_seq[:, None].expand_as(logps)
    b = mask.bool()
    return Surrogate(per_token, clipped_low=(sign < 0) & (log_ratio < -s.epsilon_low) & b,
                     clipped_high=(sign > 0) & (log_ratio > s.epsilon_high) & b)


@dataclass(frozen=True)
class LossType:
    """``algorithm.grpo.loss_type``: the policy term per token and how per-token losses become the loss."""

    surrogate: SurrogateFn
    aggregate: Aggregator


LOSS_TYPES: Registry[LossType] = Registry("loss_type")


def register_loss_type(name: str, surrogate: SurrogateFn, aggregate: Aggregator) -> LossType:
    """Add an ``algorithm.grpo.loss_type`` (third parties: from a plugin, before the trainer starts)."""
    return LOSS_TYPES.register(name, LossType(surrogate, aggregate))


register_loss_type("grpo", clipped_surrogate, sequence_mean)
register_loss_type("bnpo", clipped_surrogate, batch_token_mean)
register_loss_type("dr_grpo", clipped_surrogate, constant_length_mean)
register_loss_type("dapo", clipped_surrogate, global_token_mean)
register_loss_type("cispo", cispo_surrogate, global_token_mean)  # MiniMax-M1 and TRL: token mean over the batch
register_loss_type("sapo", sapo_surrogate, sequence_mean)  # TRL and verl: seq-mean-token-mean
register_loss_type("gmpo", gmpo_surrogate, sequence_mean)  # verl: mean over completions


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float,
                      pool: torch.Tensor | None = None) -> torch.Tensor:
    """The scored tokens whose entropy is at least the (1 - quantile) quantile of ``pool`` (default: the
    scored tokens' entropies; the trainer passes every process's): "Beyond the 80/20 Rule" (arXiv
    2506.01939), TRL's ``get_high_entropy_mask`` (quantile 0 keeps the highest-entropy token, 1 all)."""
    b = mask.bool()
    values = entropy.detach()[b].float() if pool is None else pool.float()
    if values.numel() == 0:
        return torch.zeros_like(b)
    threshold = torch.quantile(values, 1.0 - quantile)
    return (entropy.detach() >= threshold) & b


@dataclass
class LossOutput:
    loss: torch.Tensor
    per_token_kl: torch.Tensor | None
    clipped_low: torch.Tensor  # (N, T) bool: tokens the loss type's clip acted on from below (see each surrogate)
    clipped_high: torch.Tensor  # (N, T) bool: ... from above
    entropy_mask: torch.Tensor | None = None  # (N, T) bool: the tokens that got the policy term (top_entropy_quantile < 1)


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                settings: LossSettings, *, ref_logps: torch.Tensor | None = None,
                num_items: float | None = None, token_weights: torch.Tensor | None = None,
                norm: LossNorm | None = None, kl_logps: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None, entropy_pool: torch.Tensor | None = None) -> LossOutput:
    """The loss type's surrogate + beta * k3 KL, aggregated as the loss type says, minus the entropy bonus.

    Log ratios and the KL are clamped to verl's bounds (see LOG_RATIO_BOUND), so outlier tokens give a
    finite loss. A zero-length completion (all-zero mask row) adds 0 to every numerator and counts as
    TRL counts it: one sequence in grpo's mean and dr_grpo's denominator, no tokens in bnpo / dapo.

    ``token_weights``: the truncated importance weights between the rollout engine's and the learner's
    logprobs; they multiply the surrogate per token (gmpo: per completion, see gmpo_surrogate). ``norm``
    holds the whole step's denominators when these rows are one micro-batch of it (default: these rows
    are the step). ``kl_logps``: the policy's
    logprobs under the KL term's convention when it differs from the ratio's (untruncated when sampling
    truncates, see docs/sampling.md; default ``logps``).

    Entropy control, as TRL's GRPOTrainer does it, needs ``entropy`` (N, T), the scored tokens' entropy
    (with its gradient for the bonus). ``top_entropy_quantile`` < 1: only the tokens of
    :func:`high_entropy_mask` (threshold from ``entropy_pool``, default these tokens) keep the surrogate;
    denominators and the KL term stay those of all scored tokens. ``entropy_coef``: the loss minus
    coef x the mean entropy of the tokens that got the surrogate, whatever the loss type's normalisation.
    With micro-batches that mean is the micro-batch's, weighted by its share of the step's tokens (without
    an entropy mask: exactly the step's token mean; with one, each micro-batch has its own threshold, as
    in TRL, where micro-batch means are averaged unweighted).
    """
    loss_type = LOSS_TYPES.get(settings.loss_type)  # ValueError naming the known ones
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = importance_ratio(logps, old_logps, mask, settings.importance_sampling_level)
    surrogate = loss_type.surrogate(logps, old_logps, ratio, adv, mask, settings, token_weights)
    per_token = surrogate.per_token
    entropy_mask = None
    if settings.top_entropy_quantile < 1.0 or settings.entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("top_entropy_quantile < 1 and entropy_coef != 0 need the tokens' entropy")
    if settings.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropy, mask, settings.top_entropy_quantile, entropy_pool)
        per_token = per_token * entropy_mask
    kl = None
    if settings.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs reference logprobs")
        kl = k3_kl(logps if kl_logps is None else kl_logps, ref_logps)
        weighted_kl = kl * ratio if settings.kl_importance_weighting else kl
        per_token = per_token + settings.beta * weighted_kl
    if norm is None:
        norm = LossNorm.of(mask, num_items)
    loss = loss_type.aggregate(per_token, mask, settings, norm)
    if settings.entropy_coef != 0.0:
        trained = mask if entropy_mask is None else mask * entropy_mask
        mean_entropy = torch.where(trained.bool(), entropy, 0.0).sum() / trained.sum().clamp(min=1.0)
        loss = loss - settings.entropy_coef * mean_entropy * (mask.sum() / max(norm.tokens, 1.0))
    return LossOutput(loss=loss, per_token_kl=kl, clipped_low=surrogate.clipped_low,
                      clipped_high=surrogate.clipped_high, entropy_mask=entropy_mask)
