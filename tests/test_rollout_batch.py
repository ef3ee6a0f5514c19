"""The rollout batch: groups read from per-completion ids, never from a stride (issue 21, point 4)."""

from __future__ import annotations

import pytest
import torch

from r1_mm.data.prompts import Sample
from r1_mm.models.forward.grouped import pad_completions
from r1_mm.rollout.base import Completion
from r1_mm.rollout.batch import RolloutBatch, group_grid
from r1_mm.trainers.grpo import flat_groups
from r1_mm.trainers.losses import STD_EPS, grpo_advantages, nan_std


def stride_advantages(rewards: torch.Tensor, g: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference copy of the formula before the batch carried group ids: groups by stride G."""
    grouped = rewards.view(-1, g)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(g)
    group_std = nan_std(grouped, dim=1).repeat_interleave(g)
    std = nan_std(rewards).expand_as(rewards) if scale == "batch" else group_std
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + STD_EPS)
    zero = torch.isclose(torch.nan_to_num(group_std, nan=0.0), torch.zeros_like(group_std))
    return torch.nan_to_num(adv, nan=0.0), zero


def stride_flat_groups(totals: torch.Tensor, g: int) -> list[bool]:
    """Reference copy of dynamic sampling's flat-group test before the batch."""
    return [bool(torch.nan_to_num(t, nan=0.0).std() == 0) for t in totals.view(-1, g)]


def sample(i: int) -> Sample:
    return Sample(index=i, row_id=f"row-{i}", row={"problem_type": "t"}, messages=[], num_prompt_tokens=10 + i)


def completion(length: int, truncated: bool = False) -> Completion:
    return Completion(text="x" * length, token_ids=list(range(1, length + 1)), logprobs=[-0.5] * length,
                      truncated=truncated)


SIZES = [3, 1, 4, 2]  # unequal groups; the third holds a truncated and a zero-length completion


@pytest.fixture
def batch() -> RolloutBatch:
    groups = [[completion(2), completion(5), completion(1)], [completion(3)],
              [completion(4), completion(6, truncated=True), completion(0), completion(2)],
              [completion(1), completion(2)]]
    return RolloutBatch.from_groups([sample(i) for i in range(4)], groups, policy_version=7, first_group=40,
                                    mask_truncated=True)


def test_unequal_groups_carry_their_ids_sizes_and_versions(batch):
    assert len(batch) == 10 and batch.num_prompts == 4
    assert batch.group_sizes.tolist() == SIZES
    assert batch.prompt_index.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 3, 3]
    assert batch.group_ids.tolist() == [40, 40, 40, 41, 42, 42, 42, 42, 43, 43]
    assert batch.policy_version.tolist() == [7] * 10
    assert batch.row_ids[3:5] == ["row-1", "row-2"]
    assert [(i, s.row_id, r) for i, s, r in batch.groups()] == [
        (0, "row-0", slice(0, 3)), (1, "row-1", slice(3, 4)), (2, "row-2", slice(4, 8)), (3, "row-3", slice(8, 10))]
    assert [len(g) for g in batch.grouped_completions()] == SIZES
    assert batch.truncated.tolist() == [False] * 5 + [True] + [False] * 4
    with pytest.raises(ValueError, match=r"unequal sizes \[1, 2, 3, 4\]"):
        _ = batch.uniform_group_size


def test_masks_are_the_scorers_and_the_loss_drops_truncated_completions(batch):
    _, scorer_mask = pad_completions(batch.token_ids, pad_id=0, device=torch.device("cpu"))
    assert torch.equal(batch.completion_mask, scorer_mask)
    assert batch.loss_mask.sum(-1).tolist() == [2, 5, 1, 3, 4, 0, 0, 2, 1, 2]  # truncated row 5 counts nothing
    kept = RolloutBatch.from_groups(batch.samples, batch.grouped_completions(), policy_version=0)
    assert torch.equal(kept.loss_mask, kept.completion_mask)


def test_group_statistics_of_unequal_groups(batch):
    values = torch.tensor([1.0, 2.0, 6.0, 5.0, 0.0, float("nan"), 4.0, 2.0, 3.0, 3.0])
    grid = batch.group_grid(values)
    assert grid.shape == (4, 4)
    torch.testing.assert_close(torch.nanmean(grid, dim=1), torch.tensor([3.0, 5.0, 2.0, 3.0]))
    assert torch.isnan(nan_std(grid, dim=1)[1])  # one value: no std
    torch.testing.assert_close(nan_std(grid, dim=1)[[0, 2, 3]], torch.stack(
        [values[0:3].std(), values[[4, 6, 7]].std(), values[8:10].std()]))
    adv = grpo_advantages(values, batch.group_ids, scale="group")
    for _, _, rows in batch.groups():
        got, v = adv.values[rows], values[rows]
        ok = ~torch.isnan(v)
        expected = (v[ok] - v[ok].mean()) / (v[ok].std() + STD_EPS) if ok.sum() > 1 else torch.zeros_like(v[ok])
        torch.testing.assert_close(got[ok], expected)
        assert (got[~ok] == 0).all()
    assert adv.group_std_zero.tolist() == [False] * 3 + [True] + [False] * 4 + [True] * 2
    assert flat_groups(values, batch) == [False, True, False, True]


def test_group_ids_in_any_order_group_the_same():
    ids = torch.tensor([5, 9, 5, 2, 9, 5])
    grid, dense = group_grid(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), ids)
    assert dense.tolist() == [1, 2, 1, 0, 2, 1]
    assert grid.tolist()[1] == [1.0, 3.0, 6.0] and grid[0, 0] == 4.0 and torch.isnan(grid[0, 1:]).all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("g", [2, 4, 8])
def test_advantages_through_the_batch_equal_the_stride_formula_bit_for_bit(scale, g):
    gen = torch.Generator().manual_seed(g)
    prompts, processes = 3, 2
    rewards = torch.randn(processes * prompts * g, generator=gen) * 3
    rewards[torch.rand(rewards.shape, generator=gen) < 0.2] = float("nan")  # rewards that did not apply
    rewards[:g] = 1.0  # a flat group
    expected, expected_zero = stride_advantages(rewards, g, scale)
    # each process's batch numbers its groups from rank x prompts, as GRPOTrainer does; the ids are gathered
    batches = [RolloutBatch.from_groups([sample(i) for i in range(prompts)], [[completion(2)] * g] * prompts,
                                        policy_version=0, first_group=rank * prompts) for rank in range(processes)]
    gathered_ids = torch.cat([b.group_ids for b in batches])
    adv = grpo_advantages(rewards, gathered_ids, scale=scale)
    assert torch.equal(adv.values, expected) and torch.equal(adv.group_std_zero, expected_zero)
    for rank, b in enumerate(batches):
        mine = torch.isin(gathered_ids, b.group_ids)
        assert torch.equal(adv.values[mine], expected[rank * len(b):(rank + 1) * len(b)])
    assert flat_groups(rewards, batches[0]) + flat_groups(rewards[len(batches[0]):], batches[1]) == \
        stride_flat_groups(rewards, g)


def test_select_keeps_group_ids_and_trims_masks(batch):
    part = batch.select(range(2, 4))
    assert part.num_prompts == 2 and part.group_sizes.tolist() == [4, 2]
    assert part.prompt_index.tolist() == [0, 0, 0, 0, 1, 1]
    assert part.group_ids.tolist() == [42] * 4 + [43] * 2 and part.policy_version.tolist() == [7] * 6
    assert torch.equal(batch.rows_of(range(2, 4)), torch.arange(4, 10))
    _, scorer_mask = pad_completions(part.token_ids, pad_id=0, device=torch.device("cpu"))
    assert torch.equal(part.completion_mask, scorer_mask)  # as wide as the micro-batch's longest completion
    assert torch.equal(part.loss_mask, batch.loss_mask[4:10, :6])
    assert batch.select([3, 0]).row_ids == ["row-3", "row-3", "row-0", "row-0", "row-0"]


def test_replace_groups_keeps_slots_and_moves_values_along(batch):
    new = RolloutBatch.from_groups([sample(8), sample(9)], [[completion(1)] * 2, [completion(7)] * 5],
                                   policy_version=8)
    spliced, take = batch.replace_groups([(1, 1), (3, 0)], new)
    assert [s.row_id for s in spliced.samples] == ["row-0", "row-9", "row-2", "row-8"]
    assert spliced.group_sizes.tolist() == [3, 5, 4, 2]
    assert spliced.group_ids.tolist() == [40] * 3 + [41] * 5 + [42] * 4 + [43] * 2  # the slots' ids
    assert spliced.policy_version.tolist() == [7] * 3 + [8] * 5 + [7] * 4 + [8] * 2
    assert take.tolist() == [0, 1, 2, 12, 13, 14, 15, 16, 4, 5, 6, 7, 10, 11]
    values = torch.cat([torch.arange(10.0), 100 + torch.arange(7.0)])[take]
    assert values[spliced.rows(1)].tolist() == [102.0, 103.0, 104.0, 105.0, 106.0]
    assert spliced.completion_mask.shape == (14, 7)


def test_rows_out_of_order_are_refused():
    with pytest.raises(ValueError, match="non-decreasing positions"):
        RolloutBatch(samples=[sample(0), sample(1)], completions=[completion(1)] * 2,
                     prompt_index=torch.tensor([1, 0]), group_ids=torch.tensor([1, 0]),
                     policy_version=torch.zeros(2, dtype=torch.long))
