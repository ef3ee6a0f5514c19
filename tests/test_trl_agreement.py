"""Identical inputs through TRL's GRPOTrainer loss and ours give the same loss and per-token logprobs."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import GRPOConfig, GRPOTrainer

from r1_mm.config.recipe import DataConfig, MediaConfig
from r1_mm.data import PromptBuilder
from r1_mm.data.loading import default_media_root, read_rows
from r1_mm.models.forward import packed_attention
from r1_mm.models.forward.grouped import grouped_logprobs, pack_groups, pad_completions
from r1_mm.trainers.losses import LossSettings, grpo_advantages, policy_loss

G = 3
GROUP_IDS = torch.tensor([0, 0, 0, 1, 1, 1])  # two prompts' groups of G completions
TEMPERATURE = 0.9
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


@pytest.fixture(scope="module")
def setup(tiny_path, synthetic_data, tmp_path_factory):
    path = tiny_path("qwen2_5_vl")
    processor = AutoProcessor.from_pretrained(path)
    data = synthetic_data["counting"]
    builder = PromptBuilder(processor, DataConfig(), MediaConfig(), default_media_root(data))
    rows = read_rows(data)
    rows[1] = dict(rows[1], prompt=rows[1]["prompt"] + " Answer with a single number, nothing else.")
    prompts = [builder.prepare(rows[i], i).inputs for i in range(2)]
    gen = torch.Generator().manual_seed(1)
    completions = [torch.randint(0, 400, (n,), generator=gen).tolist() for n in [4, 7, 2, 6, 3, 5]]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0])
    return path, processor, prompts, completions, rewards, tmp_path_factory.mktemp("trl")


def trl_inputs(processor, prompts, completions, advantages, old, ref):
    """TRL's per-completion layout: left-padded prompts repeated G times, media repeated per row."""
    pad = processor.tokenizer.pad_token_id
    p_max = max(p["input_ids"].shape[1] for p in prompts)
    rows = len(completions)
    prompt_ids = torch.full((rows, p_max), pad, dtype=torch.long)
    prompt_mask = torch.zeros((rows, p_max), dtype=torch.long)
    mm = torch.zeros((rows, p_max), dtype=torch.long)
    pixel_values, grids = [], []
    for i, p in enumerate(prompts):
        n = p["input_ids"].shape[1]
        for j in range(G):
            r = i * G + j
            prompt_ids[r, p_max - n:] = p["input_ids"][0]
            prompt_mask[r, p_max - n:] = 1
            mm[r, p_max - n:] = p["mm_token_type_ids"][0]
            pixel_values.append(p["pixel_values"])
            grids.append(p["image_grid_thw"])
    completion_ids, completion_mask = pad_completions(completions, pad, torch.device("cpu"))
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "pixel_values": torch.cat(pixel_values), "image_grid_thw": torch.cat(grids), "num_images": [1] * rows,
        "mm_token_type_ids": torch.cat([mm, torch.zeros_like(completion_ids)], dim=1),
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": completion_mask.sum(),
    }


def trl_trainer(path, processor, out, **grpo_config) -> GRPOTrainer:
    """TRL's GRPOTrainer on the tiny model, ready for ``_compute_loss`` (one accumulation step)."""
    config = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, report_to=[], num_generations=G,
                        per_device_train_batch_size=G, temperature=TEMPERATURE, **grpo_config)
    trainer = GRPOTrainer(model=AutoModelForImageTextToText.from_pretrained(path),
                          reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=config,
                          train_dataset=Dataset.from_list([{"prompt": "x"}] * 4), processing_class=processor)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("is_level", ["token", "sequence"])
@pytest.mark.parametrize("kl_weighting", [True, False])
def test_loss_and_logprobs_equal_trl(setup, loss_type, is_level, kl_weighting):
    path, processor, prompts, completions, rewards, tmp = setup
    beta, eps_low, eps_high, max_len = 0.04, 0.2, 0.28, 8
    trainer = trl_trainer(path, processor, tmp / f"{loss_type}-{is_level}-{kl_weighting}", loss_type=loss_type, beta=beta,
                          epsilon=eps_low, epsilon_high=eps_high, importance_sampling_level=is_level,
                          max_completion_length=max_len, use_bias_correction_kl=kl_weighting)
    ours = AutoModelForImageTextToText.from_pretrained(path)

    packed = pack_groups(ours, [dict(p) for p in prompts], completions, G, processor.tokenizer.pad_token_id)
    logps, _ = grouped_logprobs(ours, packed, temperature=TEMPERATURE)
    assert packed_attention.is_enabled(ours)  # our side really is the packed grouped forward
    mask = packed.completion_mask
    gen = torch.Generator().manual_seed(2)
    shift = torch.tensor([0.5, -0.5, 0.0, 0.4, -0.4, 0.1])[:, None]  # moves sequence-level ratios out of the clip
    old = (logps.detach() + shift + 0.3 * torch.randn(logps.shape, generator=gen)) * mask  # exercises both clips
    ref = (logps.detach() + 0.2 * torch.randn(logps.shape, generator=gen)) * mask
    advantages = grpo_advantages(rewards, GROUP_IDS, scale="group").values

    inputs = trl_inputs(processor, prompts, completions, advantages, old, ref)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    trl_logps, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, input_ids, attention, inputs["completion_ids"].shape[1], pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"], num_images=inputs["num_images"],
        mm_token_type_ids=inputs["mm_token_type_ids"])
    m = mask.bool()
    torch.testing.assert_close(logps[m], trl_logps[m], atol=1e-5, rtol=0)

    trl_loss = trainer._compute_loss(trainer.model, inputs)
    settings = LossSettings(loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, beta=beta,
                            importance_sampling_level=is_level, max_completion_length=max_len,
                            kl_importance_weighting=kl_weighting)
    # the loss formula alone: our policy_loss on TRL's own logprobs reproduces TRL's loss
    on_trl = policy_loss(trl_logps.detach(), old, advantages, mask, settings, ref_logps=ref, num_items=float(mask.sum()))
    torch.testing.assert_close(on_trl.loss, trl_loss.detach(), atol=1e-7, rtol=1e-6)
    # the whole pipeline (grouped forward + loss) agrees to float32 forward noise
    our = policy_loss(logps, old, advantages, mask, settings, ref_logps=ref, num_items=float(mask.sum()))
    torch.testing.assert_close(our.loss, trl_loss.detach(), atol=1e-5, rtol=0)
    assert abs(float(our.loss.detach())) > 1e-4  # a loss that is not trivially zero
    assert our.clipped_low.any() or our.clipped_high.any()


def test_advantages_match_trl_definition():
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0, float("nan"), 1.0, 3.0])
    adv = grpo_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]), scale="group")
    grouped = rewards.view(-1, 3)
    g0 = (grouped[0] - grouped[0].mean()) / (grouped[0].std() + 1e-4)
    torch.testing.assert_close(adv.values[:3], g0)
    assert adv.values[3:6].abs().max() == 0 and adv.group_std_zero[3:6].all()
    assert adv.values[6] == 0  # None rewards get no advantage and do not shift the baseline
    torch.testing.assert_close(adv.values[7:], torch.tensor([-1.0, 1.0]) / (torch.tensor([1.0, 3.0]).std() + 1e-4))
    batch = grpo_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), torch.tensor([0, 0, 1, 1]), scale="batch")
    std = torch.tensor([1.0, 0.0, 3.0, 3.0]).std()
    torch.testing.assert_close(batch.values, torch.tensor([0.5, -0.5, 0.0, 0.0]) / (std + 1e-4))
    none = grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), scale="none")
    torch.testing.assert_close(none.values, torch.tensor([0.5, -0.5]))


# verl's bounds (verl/trainer/ppo/core_algos.py, github.com/volcengine/verl @ b178a3c): compute_policy_loss_vanilla
# clamps log(pi/pi_old) to +-20 before exp, compute_policy_loss_gspo the sequence log ratio to at most 10, and
# kl_penalty("low_var_kl") clamps r = ref - logp to +-20 and exp(r) - r - 1 to +-10.
VERL_LOG_RATIO, VERL_SEQUENCE_LOG_RATIO_MAX, VERL_KL_LOG_RATIO, VERL_KL = 20.0, 10.0, 20.0, 10.0


def k3_root(value: float, sign: float) -> float:
    """The r of the given sign with exp(r) - r - 1 = value (bisection; k3 is monotone on each side of 0)."""
    lo, hi = (0.0, 50.0) if sign > 0 else (-50.0, 0.0)
    for _ in range(200):
        mid = (lo + hi) / 2
        above = torch.tensor(mid, dtype=torch.float64).exp().item() - mid - 1 > value
        lo, hi = ((lo, mid) if above else (mid, hi)) if sign > 0 else ((mid, hi) if above else (lo, mid))
    return (lo + hi) / 2


def moved_to_verl_bounds(logps, old, ref, mask, level):
    """old and ref logprobs moved so that TRL's unclamped formulas meet exactly the ratios and KL values
    verl's bounds allow: TRL's own loss on them is the bounded loss."""
    lp, m = logps.double(), mask.double()
    if level == "token":
        new_old = lp - (lp - old.double()).clamp(-VERL_LOG_RATIO, VERL_LOG_RATIO)
    else:
        n = m.sum(-1).clamp(min=1.0)
        excess = ((((lp - old.double()) * m).sum(-1) / n) - VERL_SEQUENCE_LOG_RATIO_MAX).clamp(min=0.0)
        new_old = old.double().clone()
        new_old[:, 0] += excess * n  # completions are left-aligned: token 0 is scored wherever excess > 0
    r = (ref.double() - lp).clamp(-VERL_KL_LOG_RATIO, VERL_KL_LOG_RATIO)
    over = (r.exp() - r - 1) > VERL_KL
    r = torch.where(over & (r > 0), k3_root(VERL_KL, 1.0), torch.where(over, k3_root(VERL_KL, -1.0), r))
    return new_old.float(), (lp + r).float()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("is_level", ["token", "sequence"])
def test_outlier_tokens_and_zero_length_completions_match_trl_within_verl_bounds(setup, loss_type, is_level):
    """Log ratios of +-50, a KL whose exp overflows, and two zero-length completions (one holding outliers on
    its masked-out positions). TRL's loss is not finite there; ours is, and equals TRL's own loss on inputs
    moved to verl's bounds, so the zero-length rows weigh exactly as in TRL for every loss type."""
    path, processor, prompts, _, _, tmp = setup
    beta, max_len = 0.04, 8
    gen = torch.Generator().manual_seed(3)
    completions = [torch.randint(0, 400, (n,), generator=gen).tolist() for n in [4, 0, 3, 6, 5, 0]]
    trainer = trl_trainer(path, processor, tmp / f"outliers-{loss_type}-{is_level}", loss_type=loss_type, beta=beta,
                          epsilon=0.2, epsilon_high=0.28, importance_sampling_level=is_level,
                          max_completion_length=max_len)
    advantages = grpo_advantages(torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0, 0.0]), GROUP_IDS, scale="group").values
    placeholder = torch.zeros(len(completions), max(map(len, completions)))
    inputs = trl_inputs(processor, prompts, completions, advantages, placeholder, placeholder)
    mask = inputs["completion_mask"]
    assert mask.shape[1] == 6 and (mask.sum(-1) == 0).tolist() == [False, True, False, False, False, True]
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], mask], dim=1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention, mask.shape[1], pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"], num_images=inputs["num_images"],
            mm_token_type_ids=inputs["mm_token_type_ids"])
    old = logps + 0.1 * torch.randn(logps.shape, generator=gen)
    ref = logps + 0.1 * torch.randn(logps.shape, generator=gen)
    old[0, 1] = logps[0, 1] - 50.0  # log ratio +50 on a negative advantage: the unclipped branch
    old[2, 0] = logps[2, 0] + 50.0  # log ratio -50
    ref[3, 2] = logps[3, 2] + 100.0  # exp(100) overflows float32: TRL's KL is inf
    ref[4, 1] = logps[4, 1] - 100.0  # k3 = 99
    old[1, 0], ref[1, 1] = logps[1, 0] - 50.0, logps[1, 1] + 100.0  # outliers on a zero-length completion
    assert advantages[0] < 0

    raw = trainer._compute_loss(trainer.model, {**inputs, "old_per_token_logps": old, "ref_per_token_logps": ref})
    assert not torch.isfinite(raw)  # the premise: unbounded formulas break on these tokens
    bounded_old, bounded_ref = moved_to_verl_bounds(logps, old, ref, mask, is_level)
    expected = trainer._compute_loss(trainer.model, {**inputs, "old_per_token_logps": bounded_old,
                                                     "ref_per_token_logps": bounded_ref}).detach()
    assert torch.isfinite(expected) and abs(float(expected)) > 1.0  # an outlier dominates, bounded

    settings = LossSettings(loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, beta=beta,
                            importance_sampling_level=is_level, max_completion_length=max_len)
    ours_logps = logps.clone().requires_grad_()
    out = policy_loss(ours_logps, old, advantages, mask, settings, ref_logps=ref, num_items=float(mask.sum()))
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-4, atol=1e-6)
    out.loss.backward()
    assert torch.isfinite(ours_logps.grad).all()


# loss types beyond PPO's clip and entropy control: TRL's settings, and ours for the same loss. TRL's cispo caps
# the IS weight at epsilon_high with no floor; ours clips to [1 - epsilon, 1 + epsilon_high] (MiniMax-M1's form):
# epsilon = 1 (floor 0) and epsilon_high = TRL's - 1 are TRL's.
VARIANTS = {
    "cispo": (dict(loss_type="cispo", epsilon_high=1.3), dict(loss_type="cispo", epsilon_low=1.0, epsilon_high=0.3)),
    "sapo": (dict(loss_type="sapo", sapo_temperature_pos=2.0, sapo_temperature_neg=3.0),
             dict(loss_type="sapo", sapo_temperature_pos=2.0, sapo_temperature_neg=3.0)),
    "dapo-top30-bonus": (dict(loss_type="dapo", top_entropy_quantile=0.3, entropy_coef=0.05),
                         dict(loss_type="dapo", top_entropy_quantile=0.3, entropy_coef=0.05)),
    "cispo-bonus": (dict(loss_type="cispo", epsilon_high=1.3, entropy_coef=0.05),
                    dict(loss_type="cispo", epsilon_low=1.0, epsilon_high=0.3, entropy_coef=0.05)),
    "sapo-top50-bonus": (dict(loss_type="sapo", top_entropy_quantile=0.5, entropy_coef=0.02),
                         dict(loss_type="sapo", top_entropy_quantile=0.5, entropy_coef=0.02)),
}


@pytest.mark.parametrize("case", list(VARIANTS))
def test_loss_variants_and_entropy_control_equal_trl(setup, case):
    """TRL's own _compute_loss (cispo, sapo, top_entropy_quantile, entropy_coef) on the inputs of the test above:
    equal loss from TRL's logprobs and entropies, equal loss (and parameter gradients, with the entropy mask
    and the bonus) from our grouped forward's."""
    path, processor, prompts, completions, rewards, tmp = setup
    trl_args, ours_args = VARIANTS[case]
    beta, max_len = 0.04, 8
    trainer = trl_trainer(path, processor, tmp / f"variant-{case}", beta=beta, max_completion_length=max_len, **trl_args)
    ours = AutoModelForImageTextToText.from_pretrained(path)
    packed = pack_groups(ours, [dict(p) for p in prompts], completions, G, processor.tokenizer.pad_token_id)
    logps, entropy = grouped_logprobs(ours, packed, temperature=TEMPERATURE, with_entropy=True)
    mask = packed.completion_mask
    gen = torch.Generator().manual_seed(2)
    shift = torch.tensor([0.5, -0.5, 0.0, 0.4, -0.4, 0.1])[:, None]
    old = (logps.detach() + shift + 0.3 * torch.randn(logps.shape, generator=gen)) * mask
    ref = (logps.detach() + 0.2 * torch.randn(logps.shape, generator=gen)) * mask
    advantages = grpo_advantages(rewards, GROUP_IDS, scale="group").values

    inputs = trl_inputs(processor, prompts, completions, advantages, old, ref)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        trl_logps, trl_entropy, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention, inputs["completion_ids"].shape[1], compute_entropy=True,
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
            num_images=inputs["num_images"], mm_token_type_ids=inputs["mm_token_type_ids"])
    m = mask.bool()
    torch.testing.assert_close(entropy[m], trl_entropy[m], atol=1e-5, rtol=0)

    trl_loss = trainer._compute_loss(trainer.model, inputs)
    settings = LossSettings(beta=beta, max_completion_length=max_len, **ours_args)
    on_trl = policy_loss(trl_logps, old, advantages, mask, settings, ref_logps=ref, num_items=float(mask.sum()),
                         entropy=trl_entropy)
    torch.testing.assert_close(on_trl.loss, trl_loss.detach(), atol=1e-7, rtol=1e-6)
    our = policy_loss(logps, old, advantages, mask, settings, ref_logps=ref, num_items=float(mask.sum()),
                      entropy=entropy)
    torch.testing.assert_close(our.loss, trl_loss.detach(), atol=1e-5, rtol=0)
    assert abs(float(our.loss.detach())) > 1e-4
    if settings.top_entropy_quantile < 1.0:  # the premise: the mask kept some tokens and dropped others
        assert 0 < int(our.entropy_mask.sum()) < int(m.sum())
    if settings.loss_type == "cispo":
        assert our.clipped_high.any()  # the cap acted

    if case == "dapo-top30-bonus":  # the bonus's gradient through our scorer's entropy is TRL's through full logits
        # (one case: two backward passes through the model cost seconds)
        trl_loss.backward()
        our.loss.backward()
        trl_params = dict(trainer.model.named_parameters())
        compared = [name for name, p in ours.named_parameters() if p.grad is not None]
        assert compared == [name for name, p in trl_params.items() if p.grad is not None]
        for name in compared:
            torch.testing.assert_close(dict(ours.named_parameters())[name].grad, trl_params[name].grad,
                                       atol=1e-5, rtol=1e-4, msg=name)
        assert float(ours.lm_head.weight.grad.abs().max()) > 1e-3
