"""bf16 full fine-tuning outside DeepSpeed keeps fp32 master weights: at the recipes' learning rates
(1e-6) the updates of a bf16 model moved as the fp32 run's did, instead of rounding away."""

from __future__ import annotations

import copy

import torch

from r1_mm.config.recipe import load_recipe
from r1_mm.trainers import backend
from r1_mm.trainers.master_weights import MasterWeightAdamW

LR, STEPS = 1e-6, 20


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        x = torch.randn(16, 32, generator=g).to(dtype)
        loss = model(x).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def moved(model: torch.nn.Module, start: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.detach().float() - start[n]).flatten() for n, p in model.named_parameters()])


def fp32_and_bf16_copies() -> tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    fp32 = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    with torch.no_grad():  # start both runs from the same, bf16-representable weights
        for p in fp32.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    start = {n: p.detach().clone() for n, p in fp32.named_parameters()}
    return fp32, copy.deepcopy(fp32).to(torch.bfloat16), start


def test_bf16_updates_follow_the_fp32_run_at_small_learning_rates():
    fp32, bf16, start = fp32_and_bf16_copies()
    train(fp32, torch.optim.AdamW(fp32.parameters(), lr=LR), torch.float32)
    optimizer = MasterWeightAdamW(list(bf16.parameters()), lr=LR)
    train(bf16, optimizer, torch.bfloat16)
    reference = moved(fp32, start)
    masters = torch.cat([(m - start[n]).flatten() for (n, _), m in zip(bf16.named_parameters(), optimizer.masters,
                                                                        strict=True)])
    assert reference.abs().mean() > 0.2 * STEPS * LR  # Adam moves each weight by up to lr a step
    # the fp32 masters moved as the fp32 run did (bf16 forward/backward noise only)
    assert (masters - reference).norm() / reference.norm() < 0.05
    assert torch.nn.functional.cosine_similarity(masters, reference, dim=0) > 0.99
    # the model's own bf16 weights are the masters, rounded
    for p, m in zip(bf16.parameters(), optimizer.masters, strict=True):
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))


def test_plain_adamw_on_bf16_loses_the_updates():
    """The failure the master weights exist for (the premise of the test above)."""
    _, bf16, start = fp32_and_bf16_copies()
    train(bf16, torch.optim.AdamW(bf16.parameters(), lr=LR), torch.bfloat16)
    displacement = moved(bf16, start)
    assert (displacement != 0).float().mean() < 0.05  # only weights within ~1e-4 of zero can move at all


def test_masters_survive_a_state_dict_round_trip():
    _, bf16, _ = fp32_and_bf16_copies()
    optimizer = MasterWeightAdamW(list(bf16.parameters()), lr=LR)
    train(bf16, optimizer, torch.bfloat16)
    state = copy.deepcopy(optimizer.state_dict())
    restored_model = copy.deepcopy(bf16)
    restored = MasterWeightAdamW(list(restored_model.parameters()), lr=LR)
    with torch.no_grad():  # a fresh model would start its masters from the rounded bf16 weights
        for p in restored_model.parameters():
            p.add_(1.0)
    restored.load_state_dict(state)
    for m, r in zip(optimizer.masters, restored.masters, strict=True):
        assert torch.equal(m, r)  # not just the bf16-rounded values
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in restored.masters)


def test_learner_in_bf16_gets_master_weights_and_trains(tiny_path):
    """The learner a single-process bf16 recipe builds: its optimizer keeps masters, and a step at 1e-6
    changes the model."""
    cfg = load_recipe(None, [f"model.name_or_path={tiny_path('qwen2_5_vl')}", "model.dtype=bfloat16",
                             f"training.learning_rate={LR}", "training.forward_mode=naive"])
    learner = backend.build_learner(cfg, need_reference=False)
    inner = learner.optimizer.optimizer  # accelerate's wrapper around ours
    assert isinstance(inner, MasterWeightAdamW)
    assert next(learner.policy.parameters()).dtype == torch.bfloat16
    before = [m.detach().clone() for m in inner.masters]
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        loss = learner.policy(input_ids=ids, labels=ids).loss
        learner.accelerator.backward(loss)
        backend.optimizer_step(learner, max_grad_norm=None)
    displacement = torch.cat([(m - b).flatten() for m, b in zip(inner.masters, before, strict=True)])
    # three Adam steps of ~lr each, kept (the vision tower gets no gradient from text-only input)
    assert (displacement.abs() > 0.5 * LR).float().mean() > 0.2
    assert any(not torch.equal(p.detach(), b.to(p.dtype)) for p, b in zip(learner.policy.parameters(), before,
                                                                         strict=True))
