"""A step's rollouts as one typed object: each completion with its prompt, group, policy version and masks.

Why an object and not a flat list: the learner used to find a completion's group by stride
(``completions[i*G:(i+1)*G]`` belong to prompt ``i``), re-reading ``rollout.num_generations`` wherever it
needed a group. That holds only while every group has exactly G completions from the current policy;
agentic rollouts (turns, dropped samples) and asynchronous ones (completions from older weights) break
it. Here every completion carries its group id, its prompt's index and the policy version that
sampled it, and group reductions go through index tensors (:func:`group_grid`), so nothing infers a
group from a position.

Layout invariant (what the engines return and the grouped forward packs): the completions of one
prompt are contiguous and the prompts are in order, so a group's rows are a slice (:meth:`RolloutBatch.rows`)
whose bounds come from the real group sizes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from r1_mm.data.prompts import Sample
from r1_mm.data.turns import ToolContext
from r1_mm.rollout.base import Completion


def completion_mask(token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """(N, C) long, 1 on each completion's tokens, right-padded; C = the longest completion, at least 1
    (the learner's scorers pad completions to this same width, so the masks line up with their logprobs)."""
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.long)
    width = max(1, int(lengths.max())) if len(token_ids) else 1
    return (torch.arange(width)[None, :] < lengths[:, None]).long()


def group_slots(group_index: torch.Tensor) -> torch.Tensor:
    """(N,) long: each element's position among the elements of its group, in order of appearance."""
    order = torch.sort(group_index, stable=True).indices
    sizes = torch.bincount(group_index)
    starts = torch.cumsum(sizes, 0) - sizes
    slots = torch.empty_like(group_index)
    slots[order] = torch.arange(group_index.numel()) - starts[group_index[order]]
    return slots


def group_grid(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` (N,) laid out as a (groups, largest group) grid padded with NaN, and each element's
    dense group index (N,) into the grid's rows.

    Why a grid: NaN-ignoring reductions along its rows (``nanmean``, ``nan_std``) are per-group
    statistics for groups of any size (the padding counts as "no value"); for equal groups in order the
    grid is exactly ``values.view(-1, G)``, so the statistics are bit-for-bit the stride computation's.
    ``group_ids`` may be any integers (e.g. step-global ids gathered from every process); rows are in
    ascending id order.
    """
    _, dense = torch.unique(group_ids, return_inverse=True)
    slots = group_slots(dense)
    shape = (int(dense.max()) + 1, int(slots.max()) + 1) if dense.numel() else (0, 0)
    grid = torch.full(shape, float("nan"), dtype=values.dtype)
    grid[dense, slots] = values
    return grid, dense


@dataclass(frozen=True, eq=False)
class RolloutBatch:
    """The completions of a step's prompts, with what the learner needs to know about each one.

    Per prompt: ``samples``. Per completion (N of them, each prompt's group contiguous, prompts in
    order): the :class:`Completion` (token ids, the sampler's logprobs, truncated flag), its prompt's
    position in ``samples`` (``prompt_index``), its group's id (``group_ids``: numbered across the
    step's processes, so groups gathered from every process stay apart; today one group per prompt),
    the policy version that sampled it and the token masks the loss uses.
    """

    samples: list[Sample]
    completions: list[Completion]
    prompt_index: torch.Tensor  # (N,) long: position of the completion's prompt in ``samples``
    group_ids: torch.Tensor  # (N,) long: the completion's group, unique across the step's processes
    # (N,) long: optimizer steps the learner had taken when the weights that sampled it were synced
    # (0-based step count; the current step while rollouts are synchronous)
    policy_version: torch.Tensor
    mask_truncated: bool = False  # truncated completions count no tokens in the loss (loss_mask)
    completion_mask: torch.Tensor = field(init=False)  # (N, C) long: 1 on the completion's tokens
    loss_mask: torch.Tensor = field(init=False)  # (N, C) long: the tokens the loss counts (model-sampled ones)

    def __post_init__(self) -> None:
        n = len(self.completions)
        for name in ("prompt_index", "group_ids", "policy_version"):
            if tuple(getattr(self, name).shape) != (n,):
                raise ValueError(f"RolloutBatch.{name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"expected ({n},) (one per completion)")
        p = self.prompt_index
        if n and (int(p.min()) < 0 or int(p.max()) >= len(self.samples) or bool((p[1:] < p[:-1]).any())):
            raise ValueError("RolloutBatch.prompt_index must be non-decreasing positions in samples "
                             "(each prompt's completions contiguous, prompts in order)")
        mask = completion_mask(self.token_ids)
        object.__setattr__(self, "completion_mask", mask)
        trained = mask.clone()
        for row, context in enumerate(self.contexts):
            if context is not None:  # a trajectory's tool turns are context: never in the loss or the KL
                trained[row, : len(context.model_mask)] = torch.tensor(context.model_mask, dtype=torch.long)
        loss_mask = trained * (~self.truncated).long().unsqueeze(1) if self.mask_truncated else trained
        object.__setattr__(self, "loss_mask", loss_mask)

    @classmethod
    def from_groups(cls, samples: Sequence[Sample], groups: Sequence[Sequence[Completion]], *, policy_version: int,
                    first_group: int = 0, mask_truncated: bool = False) -> RolloutBatch:
        """The batch of ``groups[i]`` sampled for ``samples[i]`` by the policy after ``policy_version``
        optimizer steps; group ``i`` gets id ``first_group + i`` (this process's offset in the step's
        group numbering)."""
        if len(samples) != len(groups):
            raise ValueError(f"{len(groups)} groups for {len(samples)} prompts")
        prompt_index = torch.tensor([i for i, group in enumerate(groups) for _ in group], dtype=torch.long)
        return cls(samples=list(samples), completions=[c for group in groups for c in group],
                   prompt_index=prompt_index, group_ids=prompt_index + first_group,
                   policy_version=torch.full_like(prompt_index, policy_version), mask_truncated=mask_truncated)

    # -- per completion ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.completions)

    @property
    def num_prompts(self) -> int:
        return len(self.samples)

    @property
    def token_ids(self) -> list[list[int]]:
        return [c.token_ids for c in self.completions]

    @property
    def contexts(self) -> list[ToolContext | None]:
        """Each completion's tool turns (None: a single-turn completion): what the learner's forward needs."""
        return [c.context for c in self.completions]

    @property
    def has_tool_turns(self) -> bool:
        return any(c is not None for c in self.contexts)

    @property
    def sampler_logprobs(self) -> list[list[float] | None]:
        """The engine's logprob of each sampled token (None for a completion whose engine has none)."""
        return [c.logprobs for c in self.completions]

    @property
    def truncated(self) -> torch.Tensor:
        """(N,) bool: the completion hit max_tokens without an end-of-sequence token."""
        return torch.tensor([c.truncated for c in self.completions], dtype=torch.bool)

    @property
    def completion_samples(self) -> list[Sample]:
        """Each completion's prompt (N of them)."""
        return [self.samples[i] for i in self.prompt_index.tolist()]

    @property
    def row_ids(self) -> list[str]:
        """Each completion's prompt's row id."""
        return [s.row_id for s in self.completion_samples]

    # -- groups -----------------------------------------------------------------------------------------
    @cached_property
    def group_sizes(self) -> torch.Tensor:
        """(P,) long: completions per prompt."""
        return torch.bincount(self.prompt_index, minlength=self.num_prompts)

    @cached_property
    def _offsets(self) -> list[int]:
        return [0, *torch.cumsum(self.group_sizes, 0).tolist()]

    def rows(self, prompt: int) -> slice:
        """The rows of prompt ``prompt``'s completions (a slice: views of per-completion tensors)."""
        return slice(self._offsets[prompt], self._offsets[prompt + 1])

    def groups(self) -> Iterator[tuple[int, Sample, slice]]:
        """(prompt position, sample, rows of its completions) for every prompt, in order."""
        for i, sample in enumerate(self.samples):
            yield i, sample, self.rows(i)

    def grouped_completions(self) -> list[list[Completion]]:
        """The completions as one list per prompt (what reward runners take)."""
        return [self.completions[rows] for _, _, rows in self.groups()]

    @property
    def uniform_group_size(self) -> int:
        """The one group size, for code that packs G completions per prompt (the grouped forward)."""
        sizes = set(self.group_sizes.tolist())
        if len(sizes) != 1:
            raise ValueError(f"groups of unequal sizes {sorted(sizes)} where one group size is needed")
        return sizes.pop()

    def group_grid(self, values: torch.Tensor) -> torch.Tensor:
        """Per-completion ``values`` (N,) as a (prompts, largest group) grid padded with NaN."""
        return group_grid(values, self.prompt_index)[0]

    # -- subsets ----------------------------------------------------------------------------------------
    def rows_of(self, prompts: Sequence[int]) -> torch.Tensor:
        """(M,) long: the rows of the given prompts' completions, in the given order (to index
        per-completion tensors kept outside the batch: rewards, advantages)."""
        parts = [torch.arange(self._offsets[i], self._offsets[i + 1]) for i in prompts]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def select(self, prompts: Sequence[int]) -> RolloutBatch:
        """The batch of the given prompts only (a micro-batch): prompt positions renumbered in the given
        order, group ids and policy versions kept, masks as wide as the subset's longest completion."""
        rows = self.rows_of(prompts)
        sizes = torch.tensor([int(self.group_sizes[i]) for i in prompts], dtype=torch.long)
        return RolloutBatch(samples=[self.samples[i] for i in prompts],
                            completions=[self.completions[j] for j in rows.tolist()],
                            prompt_index=torch.repeat_interleave(torch.arange(len(sizes)), sizes),
                            group_ids=self.group_ids[rows], policy_version=self.policy_version[rows],
                            mask_truncated=self.mask_truncated)

    def replace_groups(self, swaps: Sequence[tuple[int, int]],
                       other: RolloutBatch) -> tuple[RolloutBatch, torch.Tensor]:
        """Prompt ``slot``'s group replaced by ``other``'s prompt ``j`` for each ``(slot, j)`` in ``swaps``
        (dynamic sampling); the slot keeps its position and group id, the new completions keep their
        policy version. Also returns ``take`` (M,): the new rows as indices into the rows of this batch
        followed by ``other``'s, to move per-completion tensors the same way
        (``torch.cat([mine, others])[take]``)."""
        source = dict(swaps)
        samples, parts, ids = [], [], []
        for i, sample in enumerate(self.samples):
            mine = self.rows(i)
            if i in source:
                if mine.start == mine.stop:
                    raise ValueError(f"prompt {i} has no completions, so no group id to give its replacement")
                j = source[i]
                samples.append(other.samples[j])
                parts.append(other.rows_of([j]) + len(self))
                ids.append(self.group_ids[mine][:1].expand(len(parts[-1])))
            else:
                samples.append(sample)
                parts.append(self.rows_of([i]))
                ids.append(self.group_ids[mine])
        take = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        both = [*self.completions, *other.completions]
        sizes = torch.tensor([len(p) for p in parts], dtype=torch.long)
        batch = RolloutBatch(samples=samples, completions=[both[k] for k in take.tolist()],
                             prompt_index=torch.repeat_interleave(torch.arange(len(parts)), sizes),
                             group_ids=torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long),
                             policy_version=torch.cat([self.policy_version, other.policy_version])[take],
                             mask_truncated=self.mask_truncated)
        return batch, take
