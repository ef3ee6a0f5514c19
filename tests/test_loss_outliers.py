"""Outlier tokens give finite losses, ratios and statistics bounded as verl bounds them.

verl's formulas are restated here from verl/trainer/ppo/core_algos.py (compute_policy_loss_vanilla,
compute_policy_loss_gspo, kl_penalty "low_var_kl") and verl/trainer/ppo/rollout_corr_helper.py
(SAFETY_BOUND = 20), github.com/volcengine/verl @ b178a3c. The whole loss against TRL's own
``_compute_loss`` (with zero-length completions) is in test_trl_agreement.py.
"""

from __future__ import annotations

import pytest
import torch

from r1_mm.trainers.losses import LossSettings, importance_ratio, k3_kl, policy_loss
from r1_mm.trainers.rollout_correction import importance_weights


def verl_token_ratio(log_prob, old_log_prob):
    """compute_policy_loss_vanilla: negative_approx_kl clamped to [-20, 20], then exp."""
    return torch.exp(torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0))


def verl_sequence_ratio(log_prob, old_log_prob, response_mask):
    """compute_policy_loss_gspo: the mean token log ratio per sequence, clamped to at most 10, then exp."""
    seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
    seq = torch.sum((log_prob - old_log_prob) * response_mask, dim=-1) / seq_lengths
    return torch.exp(torch.clamp(seq, max=10.0)).unsqueeze(-1)


def verl_low_var_kl(logprob, ref_logprob):
    """kl_penalty(..., "low_var_kl")."""
    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def outliers() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logps, old, ref, mask for 4 completions: +-50 log ratios, +-100 KL log ratios, a zero-length row
    whose masked-out positions hold outliers too."""
    gen = torch.Generator().manual_seed(0)
    logps = -torch.rand(4, 5, generator=gen) * 3
    old = logps + 0.1 * torch.randn(4, 5, generator=gen)
    ref = logps + 0.1 * torch.randn(4, 5, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    old[0, 1], old[2, 0], old[1, 2] = logps[0, 1] - 50, logps[2, 0] + 50, logps[1, 2] - 50
    ref[3, 2], ref[3, 4], ref[1, 3] = logps[3, 2] + 100, logps[3, 4] - 100, logps[1, 3] + 100
    return logps, old, ref, mask


def test_ratios_and_kl_equal_verls_bounded_formulas():
    logps, old, ref, mask = outliers()
    assert not torch.isfinite(torch.exp(ref - logps)).all()  # the premise: the unbounded KL overflows
    token = importance_ratio(logps, old, mask, "token")
    sequence = importance_ratio(logps, old, mask, "sequence")
    kl = k3_kl(logps, ref)
    for ours, theirs in ((token, verl_token_ratio(logps, old)), (sequence, verl_sequence_ratio(logps, old, mask)),
                         (kl, verl_low_var_kl(logps, ref))):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert float(token.max()) == pytest.approx(float(torch.exp(torch.tensor(20.0))))  # the bound is reached
    assert float(kl.max()) == 10.0


# gmpo takes its own sequence ratio: token level only (sequence level is refused at load, test_loss_variants.py)
@pytest.mark.parametrize(("loss_type", "is_level"), [
    *[(t, level) for t in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo") for level in ("token", "sequence")],
    ("gmpo", "token")])
@pytest.mark.parametrize("kl_weighting", [True, False])
def test_policy_loss_and_gradient_stay_finite(loss_type, is_level, kl_weighting):
    logps, old, ref, mask = outliers()
    logps.requires_grad_()
    settings = LossSettings(loss_type=loss_type, beta=0.04, importance_sampling_level=is_level,
                            kl_importance_weighting=kl_weighting, max_completion_length=5)
    out = policy_loss(logps, old, torch.tensor([-1.0, 0.5, 1.0, -0.5]), mask, settings, ref_logps=ref)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(logps.grad).all()
    assert not logps.grad[1].any()  # the zero-length completion: no gradient, even from its outlier positions


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_rollout_importance_weights_bounded_as_verl(mode):
    """verl's compute_rollout_correction_weights: the token log ratio, or the sequence's summed log ratio,
    clamped to +-SAFETY_BOUND (20) before exp; truncation then caps the weight."""
    logps, sampler, _, mask = outliers()
    sampler[3, 2] = logps[3, 2] + 100  # learner - sampler = -100: exp(100) overflows without the bound
    cap = 1e12  # above exp(20): the bound, not the cap, decides the largest weight
    weights, stats = importance_weights(logps, sampler, mask, mode, cap=cap, floor=0.0)
    m = mask.float()
    diff = (logps - sampler) * m
    log_ratio = diff if mode.startswith("token") else diff.sum(-1, keepdim=True).expand_as(diff)
    expected = torch.exp(torch.clamp(log_ratio, min=-20.0, max=20.0))
    torch.testing.assert_close(weights, expected if mode.endswith("truncate") else expected.masked_fill(expected > cap, 0.0))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), stats
