"""DPO-family losses on sequence logprobs, with the NLL term TPO and RPO add on chosen responses.

Formulas follow TRL's DPOTrainer (tested against it): sigmoid -log s(b*d); hinge relu(1 - b*d);
ipo (d_avg - 1/(2b))^2 on per-token averages; robust ((1-e)(-log s(b*d)) - e(-log s(-b*d))) / (1-2e),
where d = (pi_c - ref_c) - (pi_r - ref_r).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r1_mm.trainers.preference_batch import PairRows

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass(frozen=True)
class PreferenceLossSettings:
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    nll_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"algorithm.dpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.loss_type == "robust" and not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs 0 <= algorithm.dpo.label_smoothing < 0.5, got {self.label_smoothing}")


@dataclass(frozen=True)
class PreferenceNorm:
    """The full step's denominators (pairs, chosen tokens) when these rows are one micro-batch of it."""

    pairs: float
    chosen_tokens: float

    @classmethod
    def of(cls, mask: torch.Tensor, rows: PairRows) -> PreferenceNorm:
        """The denominators of these rows alone (when they are the whole step)."""
        return cls(pairs=float(len(rows)), chosen_tokens=float(mask[rows.chosen.to(mask.device)].sum()))


@dataclass
class PreferenceLossOutput:
    loss: torch.Tensor
    chosen_rewards: torch.Tensor  # beta * (pi_c - ref_c), detached
    rejected_rewards: torch.Tensor
    nll: torch.Tensor | None


def preference_loss(token_logps: torch.Tensor, mask: torch.Tensor, rows: PairRows, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, settings: PreferenceLossSettings,
                    norm: PreferenceNorm | None = None) -> PreferenceLossOutput:
    """``token_logps``/``mask``: (rows, C) scored responses; pair ``i``'s are rows ``rows.chosen[i]`` and
    ``rows.rejected[i]``; ``ref_chosen``/``ref_rejected``: (P,) the reference's sequence logprobs."""
    norm = norm or PreferenceNorm.of(mask, rows)
    rows = rows.to(token_logps.device)
    m = mask.to(token_logps.dtype)
    seq = (token_logps * m).sum(-1)
    lengths = m.sum(-1).clamp(min=1.0)
    chosen, rejected = seq[rows.chosen], seq[rows.rejected]
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    b, eps = settings.beta, settings.label_smoothing
    if settings.loss_type == "sigmoid":
        per_pair = -F.logsigmoid(b * delta)
    elif settings.loss_type == "hinge":
        per_pair = torch.relu(1 - b * delta)
    elif settings.loss_type == "ipo":
        avg = chosen_ratio / lengths[rows.chosen] - rejected_ratio / lengths[rows.rejected]
        per_pair = (avg - 1 / (2 * b)) ** 2
    else:
        per_pair = ((1 - eps) * -F.logsigmoid(b * delta) - eps * -F.logsigmoid(-b * delta)) / (1 - 2 * eps)
    loss = per_pair.sum() / max(norm.pairs, 1.0)
    nll = None
    if settings.nll_weight:
        nll = -(token_logps[rows.chosen] * m[rows.chosen]).sum() / max(norm.chosen_tokens, 1.0)
        loss = loss + settings.nll_weight * nll
    return PreferenceLossOutput(loss=loss, chosen_rewards=(b * chosen_ratio).detach(),
                                rejected_rewards=(b * rejected_ratio).detach(), nll=None if nll is None else nll.detach())
