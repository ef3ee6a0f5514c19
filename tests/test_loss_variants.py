"""The loss types beyond PPO's clip (cispo, sapo, gmpo) and entropy control (entropy_coef, top_entropy_quantile),
each against its paper's formula written out here on the same inputs (values, and gradients where the paper's
stop-gradient or clip decides them), and each in a short GRPO run whose premise is that it really was the loss
trained on. TRL's own ``_compute_loss`` on identical inputs (cispo, sapo, entropy control) is in
test_trl_agreement.py; verl's formulas (verl/trainer/ppo/core_algos.py, github.com/volcengine/verl @ b178a3c:
compute_policy_loss_cispo, compute_policy_loss_sapo, compute_policy_loss_geo_mean) are restated where named.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from r1_mm.config.recipe import ConfigError, load_recipe
from r1_mm.run.tracking import read_metrics
from r1_mm.trainers import grpo as grpo_module
from r1_mm.trainers.grpo import GRPOTrainer
from r1_mm.trainers.losses import (
    LOSS_TYPES,
    LossNorm,
    LossSettings,
    cispo_surrogate,
    high_entropy_mask,
    policy_loss,
)

from .conftest import REPO

N, T = 6, 7


def inputs(seed: int = 0, spread: float = 0.3):
    """logps (leaf, float64), old, sequence advantages of both signs, a mask with different lengths (one
    completion of a single token) -- spread moves the ratios past every clip used below."""
    gen = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(N, T, generator=gen, dtype=torch.float64) * 2 - 0.1).requires_grad_()
    old = logps.detach() + spread * torch.randn(N, T, generator=gen, dtype=torch.float64)
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, -0.3], dtype=torch.float64)
    lengths = torch.tensor([7, 5, 1, 6, 3, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    return logps, old, adv, mask


def grad_of(loss: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, logps, retain_graph=True)
    return g


# -- CISPO -------------------------------------------------------------------------------------------------------
def minimax_cispo(logps, old, adv, mask, eps_low, eps_high):
    """MiniMax-M1 eq. 4-5: J = 1/sum|o_i| sum_i sum_t sg(r_hat_it) A_i log pi_it, r_hat = clip(r, 1 - eps_low^IS,
    1 + eps_high^IS) (verl's compute_policy_loss_cispo with token-mean aggregation); the loss is -J."""
    r_hat = torch.clamp(torch.exp(logps - old), 1 - eps_low, 1 + eps_high).detach()
    return -(r_hat * adv[:, None] * logps * mask).sum() / mask.sum()


def test_cispo_value_and_gradient_match_minimax_m1():
    logps, old, adv, mask = inputs()
    settings = LossSettings(loss_type="cispo", epsilon_low=0.2, epsilon_high=0.28)
    out = policy_loss(logps, old, adv, mask, settings)
    expected = minimax_cispo(logps, old, adv, mask, 0.2, 0.28)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)
    # the weight is a constant: d loss / d log pi_t = -A w_t / sum|o| on every token, clipped or not
    ratio = torch.exp(logps.detach() - old)
    weight = torch.clamp(ratio, 0.8, 1.28)
    torch.testing.assert_close(grad_of(out.loss, logps), -(adv[:, None] * weight * mask) / mask.sum(),
                               rtol=1e-12, atol=0)
    m = mask.bool()
    assert out.clipped_high.equal((ratio > 1.28) & m) and out.clipped_low.equal((ratio < 0.8) & m)
    assert out.clipped_high.any() and out.clipped_low.any()  # both clips acted on these inputs
    # negatives: the same loss with the weight's gradient kept, or another cap, or PPO's clip, is told apart
    with_grad = -(torch.clamp(torch.exp(logps - old), 0.8, 1.28) * adv[:, None] * logps * mask).sum() / mask.sum()
    assert (grad_of(with_grad, logps) - grad_of(out.loss, logps)).abs().max() > 1e-2
    for other in (LossSettings(loss_type="cispo", epsilon_low=0.2, epsilon_high=0.5),
                  LossSettings(loss_type="cispo", epsilon_low=1.0, epsilon_high=0.28),
                  LossSettings(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28)):
        assert abs(float(policy_loss(logps, old, adv, mask, other).loss - expected)) > 1e-3, other


def test_cispo_without_a_floor_is_trls_cap():
    """TRL's cispo: -clamp(r, max=epsilon_high).detach() A log pi; ours with epsilon >= 1 (no floor) and
    epsilon_high = TRL's - 1."""
    logps, old, adv, mask = inputs(1, spread=1.0)
    trl = -(torch.clamp(torch.exp(logps - old), max=5.0).detach() * adv[:, None] * logps * mask).sum() / mask.sum()
    ours = policy_loss(logps, old, adv, mask, LossSettings(loss_type="cispo", epsilon_low=1.0, epsilon_high=4.0))
    torch.testing.assert_close(ours.loss, trl, rtol=1e-12, atol=0)
    assert not ours.clipped_low.any() and ours.clipped_high.any()


# -- SAPO --------------------------------------------------------------------------------------------------------
def sapo_paper(logps, old, adv, mask, tau_pos, tau_neg):
    """SAPO (arXiv 2511.20347): J = 1/G sum_i 1/|y_i| sum_t f_it(r_it) A_i, f(r) = sigmoid(tau (r - 1)) 4 / tau,
    tau = tau_pos if A_i > 0 else tau_neg; written per completion and token."""
    total = 0.0
    for i in range(len(adv)):
        n = int(mask[i].sum())
        tau = tau_pos if adv[i] > 0 else tau_neg
        total = total + sum(torch.sigmoid(tau * (torch.exp(logps[i, t] - old[i, t]) - 1)) * 4 / tau * adv[i]
                            for t in range(n)) / n
    return -total / len(adv)


def test_sapo_value_and_gradient_match_the_soft_gate():
    logps, old, adv, mask = inputs(2)
    settings = LossSettings(loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    out = policy_loss(logps, old, adv, mask, settings)
    torch.testing.assert_close(out.loss, sapo_paper(logps, old, adv, mask, 1.0, 1.05), rtol=1e-12, atol=0)
    # d f / d log pi = 4 sigmoid'(tau (r - 1)) r: 1 at r = 1 (the plain policy gradient), decaying away from it
    r = torch.exp(logps.detach() - old)
    tau = torch.where(adv > 0, torch.tensor(1.0, dtype=adv.dtype), torch.tensor(1.05, dtype=adv.dtype))[:, None]
    s = torch.sigmoid(tau * (r - 1))
    expected = -adv[:, None] * 4 * s * (1 - s) * r * mask / mask.sum(-1, keepdim=True) / N
    torch.testing.assert_close(grad_of(out.loss, logps), expected, rtol=1e-10, atol=1e-15)
    assert not out.clipped_low.any() and not out.clipped_high.any()
    on_policy = policy_loss(logps, logps.detach(), adv, mask, settings)  # r = 1: grpo's gradient exactly
    grpo = policy_loss(logps, logps.detach(), adv, mask, LossSettings(loss_type="grpo"))
    torch.testing.assert_close(grad_of(on_policy.loss, logps), grad_of(grpo.loss, logps), rtol=1e-12, atol=0)
    swapped = LossSettings(loss_type="sapo", sapo_temperature_pos=1.05, sapo_temperature_neg=1.0)
    assert abs(float(policy_loss(logps, old, adv, mask, swapped).loss - out.loss)) > 1e-3  # the temperatures act


# -- GMPO --------------------------------------------------------------------------------------------------------
def gmpo_paper(logps, old, adv, mask, eps_low, eps_high):
    """GMPO (arXiv 2507.20673, eq. 6): J = 1/G sum_i (prod_t min(r_t A_i, clip(r_t, e^-eps_low, e^eps_high) A_i)
    ^(1/|o_i|)) sgn(A_i), as a product of |r| factors per completion (float64, short completions)."""
    total = 0.0
    for i in range(len(adv)):
        n = int(mask[i].sum())
        a = adv[i]
        r = torch.exp(logps[i, :n] - old[i, :n])
        c = torch.clamp(r, torch.exp(torch.tensor(-eps_low, dtype=r.dtype)), torch.exp(torch.tensor(eps_high, dtype=r.dtype)))
        terms = torch.minimum(r * a, c * a)  # sign of A on every factor
        total = total + torch.prod(terms.abs()) ** (1.0 / n) * torch.sign(a) * (1 if a != 0 else 0)
    return -total / len(adv)


def verl_geo_mean(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, rollout_is_weights=None):
    """verl's compute_policy_loss_geo_mean (advantages per token, as verl passes them)."""
    negative_approx_kl = log_prob - old_log_prob
    sgn_advantage = torch.sign(advantages)
    negative_approx_kl_clamp = torch.clamp(negative_approx_kl, -clip_low, clip_high)
    negative_approx_kl_min = torch.min(sgn_advantage * negative_approx_kl, sgn_advantage * negative_approx_kl_clamp)
    negative_approx_kl_min = sgn_advantage * negative_approx_kl_min
    response_mask_sum = response_mask.sum(dim=-1)
    ratio = torch.exp((negative_approx_kl_min * response_mask).sum(dim=-1) / (response_mask_sum + 1e-8))
    advantage = (advantages * response_mask).sum(dim=-1) / (response_mask_sum + 1e-8)
    pg_losses = -advantage * ratio
    if rollout_is_weights is not None:
        seq_is_weights = torch.exp(
            (torch.log(rollout_is_weights + 1e-10) * response_mask).sum(dim=-1) / (response_mask_sum + 1e-8)
        )
        pg_losses = pg_losses * seq_is_weights
    return torch.mean(pg_losses)


def test_gmpo_value_and_gradient_match_the_geometric_mean():
    logps, old, adv, mask = inputs(3)
    settings = LossSettings(loss_type="gmpo", epsilon_low=0.2, epsilon_high=0.3)
    out = policy_loss(logps, old, adv, mask, settings)
    torch.testing.assert_close(out.loss, gmpo_paper(logps, old, adv, mask, 0.2, 0.3), rtol=1e-12, atol=0)
    verl = verl_geo_mean(old, logps, adv[:, None] * mask, mask, 0.2, 0.3)
    torch.testing.assert_close(out.loss, verl, rtol=1e-7, atol=0)  # verl divides by |o| + 1e-8
    # the rollout correction's weights: their geometric mean per completion, as verl applies them (not the
    # arithmetic mean that multiplying the spread per-token value would give)
    weights = torch.exp(0.5 * torch.randn(N, T, dtype=torch.float64, generator=torch.Generator().manual_seed(7)))
    weighted = policy_loss(logps, old, adv, mask, settings, token_weights=weights).loss
    torch.testing.assert_close(weighted, verl_geo_mean(old, logps, adv[:, None] * mask, mask, 0.2, 0.3, weights),
                               rtol=1e-7, atol=0)
    per_completion = [policy_loss(logps[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], settings).loss
                      for i in range(N)]  # -A_i rho_i each
    arithmetic = sum(loss * (weights[i] * mask[i]).sum() / mask[i].sum() for i, loss in enumerate(per_completion)) / N
    assert abs(float(weighted - arithmetic)) > 1e-3
    # token (N, T) advantages give the same loss (averaged per completion, as verl does)
    torch.testing.assert_close(policy_loss(logps, old, adv[:, None] * mask, mask, settings).loss, out.loss,
                               rtol=1e-12, atol=0)
    # gradient: -A_i rho_i / (|o_i| G) on each token the clip left alone, 0 on the clipped ones
    log_ratio = logps.detach() - old
    sign = torch.sign(adv)[:, None]
    clipped = ((sign > 0) & (log_ratio > 0.3)) | ((sign < 0) & (log_ratio < -0.2))
    bound = torch.where(sign > 0, torch.tensor(0.3, dtype=old.dtype), torch.tensor(-0.2, dtype=old.dtype))
    kept = torch.where(clipped, bound, log_ratio)
    n = mask.sum(-1)
    rho = torch.exp((kept * mask).sum(-1) / n)
    expected = -(adv * rho / n)[:, None] * mask * (~clipped) / N
    torch.testing.assert_close(grad_of(out.loss, logps), expected, rtol=1e-10, atol=1e-15)
    m = mask.bool()
    assert out.clipped_high.equal(clipped & m & (sign > 0)) and out.clipped_low.equal(clipped & m & (sign < 0))
    assert out.clipped_high.any() and out.clipped_low.any()
    # negatives: other bounds, and the arithmetic mean of the same clipped ratios (grpo), give other losses
    for other in (LossSettings(loss_type="gmpo", epsilon_low=0.2, epsilon_high=0.6),
                  LossSettings(loss_type="gmpo", epsilon_low=0.5, epsilon_high=0.3),
                  LossSettings(loss_type="grpo", epsilon_low=1 - float(torch.exp(torch.tensor(-0.2))),
                               epsilon_high=float(torch.exp(torch.tensor(0.3))) - 1)):
        assert abs(float(policy_loss(logps, old, adv, mask, other).loss - out.loss)) > 1e-3, other


def test_gmpo_refuses_sequence_level_ratios(tmp_path):
    logps, old, adv, mask = inputs()
    with pytest.raises(ValueError, match="gmpo"):
        policy_loss(logps, old, adv, mask, LossSettings(loss_type="gmpo", importance_sampling_level="sequence"))
    with pytest.raises(ConfigError, match="gmpo .*importance_sampling_level must be token"):
        load_recipe(None, [f"training.output_dir={tmp_path}", "algorithm.grpo.loss_type=gmpo",
                           "algorithm.grpo.importance_sampling_level=sequence"])


@pytest.mark.parametrize("override, message", [
    ("algorithm.grpo.top_entropy_quantile=1.5", "top_entropy_quantile"),
    ("algorithm.grpo.sapo_temperature_neg=0", "sapo_temperature_neg"),
    ("algorithm.grpo.epsilon_high=0.1", "epsilon_high must be >= algorithm.grpo.epsilon"),  # clip-higher's rule
])
def test_entropy_and_sapo_fields_validate_at_load(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, [f"training.output_dir={tmp_path}", override])
    if "epsilon_high" in override:  # cispo's floor is not clip-higher's: no floor under a tight cap loads
        cfg = load_recipe(None, [f"training.output_dir={tmp_path}", override, "algorithm.grpo.loss_type=cispo",
                                 "algorithm.grpo.epsilon=1.0"])
        assert (cfg.algorithm.grpo.epsilon, cfg.algorithm.grpo.epsilon_high) == (1.0, 0.1)


def test_loss_types_are_registry_entries():
    assert {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "gmpo"} <= set(LOSS_TYPES)
    assert LOSS_TYPES.get("cispo").surrogate is cispo_surrogate


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "gmpo"])
def test_micro_batch_shares_sum_to_the_step_loss(loss_type):
    """As test_accumulation's check for the clipped loss types, with the entropy bonus on."""
    logps, old, adv, mask = inputs(4)
    entropy = (torch.rand(N, T, dtype=torch.float64) * 3).requires_grad_()
    settings = LossSettings(loss_type=loss_type, entropy_coef=0.05, beta=0.0)
    full = policy_loss(logps, old, adv, mask, settings, entropy=entropy, num_items=30.0).loss
    norm = LossNorm.of(mask, num_items=30.0)
    shares = [policy_loss(logps[s], old[s], adv[s], mask[s], settings, entropy=entropy[s], norm=norm).loss
              for s in (slice(0, 2), slice(2, N))]
    torch.testing.assert_close(sum(shares), full, rtol=1e-12, atol=0)
    for x in (logps, entropy):
        torch.testing.assert_close(torch.autograd.grad(sum(shares), x, retain_graph=True)[0],
                                   torch.autograd.grad(full, x, retain_graph=True)[0], rtol=1e-12, atol=1e-15)


# -- entropy control ---------------------------------------------------------------------------------------------
def trl_high_entropy_mask(entropies, mask, threshold):
    """TRL's GRPOTrainer.get_high_entropy_mask, called on one process (its gather is the identity there)."""
    from trl import GRPOTrainer as TRLTrainer

    class OneProcess:
        @staticmethod
        def pad_across_processes(x, dim=0, pad_index=0):
            return x

        @staticmethod
        def gather(x):
            return x

    holder = type("Holder", (), {"accelerator": OneProcess()})()
    return TRLTrainer.get_high_entropy_mask(holder, entropies, mask, threshold)


@pytest.mark.parametrize("quantile", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_high_entropy_mask_equals_trls(quantile):
    gen = torch.Generator().manual_seed(5)
    entropy = torch.rand(N, T, generator=gen) * 4
    _, _, _, mask = inputs()
    ours = high_entropy_mask(entropy, mask, quantile)
    assert ours.equal(trl_high_entropy_mask(entropy, mask, 1 - quantile))
    kept = int(ours.sum())
    assert kept == (1 if quantile == 0.0 else int(mask.sum()) if quantile == 1.0 else kept)
    if 0.0 < quantile < 1.0:  # about the top share of the scored tokens, none of them padding
        assert abs(kept - quantile * float(mask.sum())) <= 1 and not (ours & ~mask.bool()).any()


def test_top_entropy_quantile_and_entropy_bonus_follow_trls_formula():
    """TRL's _compute_loss: per_token_loss x entropy_mask, aggregated over the full mask, minus
    coef x sum(H x mask x entropy_mask) / sum(mask x entropy_mask); the bonus's gradient reaches the entropy."""
    logps, old, adv, mask = inputs(6)
    entropy = (torch.rand(N, T, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 3).requires_grad_()
    settings = LossSettings(loss_type="grpo", epsilon_low=0.2, epsilon_high=0.28, top_entropy_quantile=0.4,
                            entropy_coef=0.03)
    out = policy_loss(logps, old, adv, mask, settings, entropy=entropy)
    em = trl_high_entropy_mask(entropy.detach(), mask, 0.6).double()
    r = torch.exp(logps - old)
    per_token = -torch.min(r * adv[:, None], torch.clamp(r, 0.8, 1.28) * adv[:, None]) * em
    policy = ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    bonus = (entropy * mask * em).sum() / (mask * em).sum()
    expected = policy - 0.03 * bonus
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)
    assert out.entropy_mask.equal(em.bool())
    g_logps, g_entropy = torch.autograd.grad(out.loss, (logps, entropy))
    assert not g_logps[~em.bool()].any() and g_logps[em.bool()].abs().sum() > 0  # low-entropy tokens: no policy term
    torch.testing.assert_close(g_entropy, -0.03 * mask * em / (mask * em).sum(), rtol=1e-12, atol=0)
    # negatives: all tokens (quantile 1) and no bonus give other losses
    for other in (dict(top_entropy_quantile=1.0), dict(entropy_coef=0.0)):
        changed = LossSettings(**{**settings.__dict__, **other})
        assert abs(float(policy_loss(logps, old, adv, mask, changed, entropy=entropy).loss - out.loss)) > 1e-3, other
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logps, old, adv, mask, settings)


# -- in a GRPO run -----------------------------------------------------------------------------------------------
REFERENCE = {  # the loss each run must have trained on, from the formulas above (entropy control: TRL's)
    "cispo": lambda c, s: minimax_cispo(c["logps"], c["old"], c["adv"], c["mask"], s.epsilon_low, s.epsilon_high),
    "sapo": lambda c, s: sapo_paper(c["logps"], c["old"], c["adv"], c["mask"], s.sapo_temperature_pos,
                                    s.sapo_temperature_neg),
    "gmpo": lambda c, s: gmpo_paper(c["logps"], c["old"], c["adv"], c["mask"], s.epsilon_low, s.epsilon_high),
}


def grpo_recipe(tmp_path: Path, data: Path, *overrides: str):
    return load_recipe(None, [
        "model.name_or_path=tiny:qwen2_5_vl:small", f"data.train_path={data}", f"training.output_dir={tmp_path / 'run'}",
        "data.format_instruction=null", "media.max_pixels=3136", "media.min_pixels=3136", "data.shuffle=false",
        "rollout.num_generations=4", "rollout.max_completion_length=4", "training.prompts_per_step=2",
        "training.max_steps=1", "training.learning_rate=1e-2", "logging.progress_bar=false",
        "algorithm.grpo.beta=0.0", "algorithm.grpo.num_iterations=2", "algorithm.grpo.rollout_is=none",
        f"rewards.functions=[{{name: '{REPO / 'tests' / 'plugins' / 'test_rewards.py'}:length_reward'}}]", *overrides])


def spy_policy_loss(monkeypatch) -> list[dict]:
    """Record every policy_loss call of the trainer: its inputs and what it returned."""
    calls = []
    real = grpo_module.policy_loss

    def spy(logps, old, adv, mask, settings, **kwargs):
        out = real(logps, old, adv, mask, settings, **kwargs)
        entropy = kwargs.get("entropy")
        calls.append({"logps": logps.detach().double(), "old": old.detach().double(), "adv": adv.double(),
                      "mask": mask.double(), "settings": settings, "out": out, "loss": float(out.loss.detach()),
                      "entropy": None if entropy is None else entropy.detach().double(),
                      "entropy_grad": entropy is not None and entropy.requires_grad, "kwargs": kwargs})
        return out

    monkeypatch.setattr(grpo_module, "policy_loss", spy)
    return calls


@pytest.fixture
def _cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))


@pytest.mark.usefixtures("_cache")
@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "gmpo"])
def test_grpo_run_trains_on_the_loss_type(tmp_path, synthetic_data, monkeypatch, loss_type):
    calls = spy_policy_loss(monkeypatch)
    extra = {"cispo": ["algorithm.grpo.epsilon=1.0", "algorithm.grpo.epsilon_high=0.05"],  # MiniMax: no floor
             "sapo": ["algorithm.grpo.sapo_temperature_pos=2.0", "algorithm.grpo.sapo_temperature_neg=3.0"],
             "gmpo": ["algorithm.grpo.epsilon=0.4", "algorithm.grpo.epsilon_high=0.4"]}[loss_type]
    cfg = grpo_recipe(tmp_path, synthetic_data["counting"], f"algorithm.grpo.loss_type={loss_type}", *extra)
    GRPOTrainer(cfg).train()
    assert len(calls) == 2  # one step, two iterations (the second off-policy)
    assert calls[0]["adv"].abs().max() > 0.1  # the rewards differ within groups: a loss to compare
    for c in calls:
        s = c["settings"]
        assert s.loss_type == loss_type
        expected = float(REFERENCE[loss_type](c, s))
        assert c["loss"] == pytest.approx(expected, abs=1e-6, rel=1e-5)
    # the off-policy iteration's loss is none of the clipped losses' on the same inputs (on-policy, gmpo's
    # value and gradient equal grpo's: r = 1 makes geometric and arithmetic means agree)
    second = calls[1]
    assert (second["logps"] - second["old"]).abs().max() > 1e-2  # the premise: really off-policy
    expected = float(REFERENCE[loss_type](second, second["settings"]))
    for other in ("dapo", "grpo"):
        value = float(policy_loss(second["logps"], second["old"], second["adv"], second["mask"],
                                  dataclasses.replace(second["settings"], loss_type=other)).loss)
        assert abs(value - expected) > 1e-4, (loss_type, other, value, expected)
    metrics = read_metrics(cfg.training.output_dir)[0]
    assert metrics["train/loss"] == pytest.approx(calls[0]["loss"], abs=1e-6)
    if loss_type == "cispo":  # the cap 1.05 acted (no floor: nothing clipped from below)
        assert float(calls[1]["out"].clipped_high.sum()) > 0 and not calls[1]["out"].clipped_low.any()


@pytest.mark.usefixtures("_cache")
def test_grpo_run_trains_on_high_entropy_tokens_with_a_bonus(tmp_path, synthetic_data, monkeypatch):
    calls = spy_policy_loss(monkeypatch)
    cfg = grpo_recipe(tmp_path, synthetic_data["counting"], "algorithm.grpo.loss_type=grpo",
                      "algorithm.grpo.top_entropy_quantile=0.5", "algorithm.grpo.entropy_coef=0.1",
                      "algorithm.grpo.num_iterations=1")
    GRPOTrainer(cfg).train()
    assert len(calls) == 1
    c = calls[0]
    s = c["settings"]
    assert (s.top_entropy_quantile, s.entropy_coef) == (0.5, 0.1)
    assert c["entropy_grad"]  # the scorer's entropy carries its gradient: the bonus trains
    em = trl_high_entropy_mask(c["entropy"], c["mask"], 0.5).double()
    assert c["out"].entropy_mask.equal(em.bool()) and 0 < em.sum() < c["mask"].sum()
    # on-policy (ratio 1): TRL's grpo loss with the entropy mask, minus the bonus over the kept tokens
    policy = ((-c["adv"][:, None] * em * c["mask"]).sum(-1) / c["mask"].sum(-1).clamp(min=1)).mean()
    bonus = (c["entropy"] * c["mask"] * em).sum() / (c["mask"] * em).sum()
    assert c["loss"] == pytest.approx(float(policy - 0.1 * bonus), abs=1e-6)
    assert abs(float(bonus)) * 0.1 > 1e-3  # the bonus is a visible part of the loss
    metrics = read_metrics(cfg.training.output_dir)[0]
    assert metrics["train/high_entropy_ratio"] == pytest.approx(float(em.sum() / c["mask"].sum()))
