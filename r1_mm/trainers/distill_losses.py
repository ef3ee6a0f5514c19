"""Per-token divergences of on-policy distillation, on full logits: the reference the tiled path is tested against.

The learner never builds (tokens x vocabulary) logits: ``token_scores`` runs TRL's ``ChunkedDivergenceFunction``
inside the student's forward. These functions are what it computes, written out once, and are themselves tested
against TRL's ``GKDTrainer.generalized_jsd_loss`` and the textbook formulas (tests/test_distill.py).

Conventions (TRL's GKD, Agarwal et al. 2024, "On-Policy Distillation of Language Models", Eq. 1): with
``p_s`` the student's and ``p_t`` the teacher's next-token distribution at the same position,

- ``reverse_kl``: KL(p_s || p_t) = sum_v p_s (log p_s - log p_t), mode-seeking: the student is pushed off the
  tokens the teacher finds unlikely, on the student's own samples (Thinking Machines' on-policy distillation);
- ``jsd`` with ``beta``: beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = (1 - beta) p_s + beta p_t;
  beta = 0 is the forward KL(p_t || p_s) and beta = 1 the reverse KL (the limits TRL special-cases).
"""

from __future__ import annotations

import math

import torch

LOSSES = ("reverse_kl", "jsd")


def divergence_beta(loss: str, beta: float) -> float:
    """The generalised-JSD ``beta`` that computes ``loss`` (reverse KL is beta = 1)."""
    if loss == "reverse_kl":
        return 1.0
    if loss == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
        return float(beta)
    raise ValueError(f"unknown distillation loss {loss!r}; known: {', '.join(LOSSES)}")


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_s || p_t) per position: logits (..., V) -> (...)."""
    s, t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    return (s.exp() * (s - t)).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """The generalised JSD per position (see the module docstring): logits (..., V) -> (...)."""
    s, t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    if beta == 0.0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1.0:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), dim=0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1.0 - beta) * (s.exp() * (s - m)).sum(-1)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss: str, beta: float,
                     temperature: float = 1.0) -> torch.Tensor:
    """The recipe's loss (``algorithm.distill.loss`` and ``beta``) per position."""
    return generalized_jsd(student_logits, teacher_logits, divergence_beta(loss, beta), temperature)


def sampled_reverse_kl(student_logps: torch.Tensor, teacher_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token loss with a served teacher, which gives only the logprob of each token the student sampled
    (Thinking Machines' "On-Policy Distillation", 2025): ``(loss, estimate)``, both shaped as the inputs.

    With ``y_t`` the student's sampled token, ``student_logps`` = log p_s(y_t) (with gradient) and ``teacher_logps`` =
    log p_t(y_t): the per-token advantage is ``A_t = -(log p_s(y_t) - log p_t(y_t))``, detached, and the loss
    ``-A_t * log p_s(y_t)`` (the trainer takes its token mean). ``estimate`` = log p_s(y_t) - log p_t(y_t), detached:
    a single-sample estimate of the reverse KL(p_s || p_t) at that position, unbiased when y_t ~ p_s.

    What its gradient estimates: at one position, E_{y ~ p_s}[(log p_s(y) - log p_t(y)) grad log p_s(y)] =
    sum_y grad p_s(y) (log p_s(y) - log p_t(y)) = grad KL(p_s || p_t) (the term sum_y p_s grad log p_s = grad 1 is 0).
    Over a sequence this is the gradient of the sum of the per-position reverse KLs along the sampled prefix with
    discount 0: each token's advantage is its own log-ratio only, and the dependence of later positions'
    distributions on earlier tokens is not differentiated through (tests/test_distill.py checks the one-position
    identity by enumeration). The loss's value itself is no divergence; log ``estimate``.
    """
    estimate = (student_logps.detach() - teacher_logps.to(student_logps.dtype)).detach()
    advantage = -estimate
    return -advantage * student_logps, estimate
