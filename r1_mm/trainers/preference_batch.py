"""A step's preference pairs as one typed object: each pair's prompt, chosen and rejected token ids,
and where each response sits among the rows the learner scores.

Why an object and not an interleaved list: the trainer used to find a pair's responses by stride
(rows ``2i`` and ``2i+1`` of the scored tensor were pair ``i``'s chosen and rejected), an assumption
repeated in the step, the micro-batch split, the reference scores and the loss. Here the layout is made
in one place (:attr:`PreferenceBatch.completions`) and read back through index tensors
(:attr:`PreferenceBatch.chosen_rows`, :attr:`PreferenceBatch.rejected_rows`), so a different layout
(pairs sharing a prompt, several rejected responses) changes this module only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from r1_mm.data.prompts import Sample


@dataclass(frozen=True)
class PairRows:
    """Rows of pair ``i``'s chosen (``chosen[i]``) and rejected (``rejected[i]``) response in a scored
    (rows, tokens) tensor."""

    chosen: torch.Tensor  # (P,) long
    rejected: torch.Tensor  # (P,) long

    def __post_init__(self) -> None:
        if self.chosen.shape != self.rejected.shape or self.chosen.dim() != 1:
            raise ValueError(f"PairRows needs one chosen and one rejected row per pair, got shapes "
                             f"{tuple(self.chosen.shape)} and {tuple(self.rejected.shape)}")

    def __len__(self) -> int:
        return int(self.chosen.numel())

    def to(self, device: torch.device | str) -> PairRows:
        return PairRows(self.chosen.to(device), self.rejected.to(device))


@dataclass(frozen=True, eq=False)
class PreferenceBatch:
    """Pairs ``i``: ``samples[i]`` (prompt and media) with ``chosen[i]`` preferred over ``rejected[i]``."""

    samples: list[Sample]
    chosen: list[list[int]]
    rejected: list[list[int]]

    def __post_init__(self) -> None:
        if not len(self.samples) == len(self.chosen) == len(self.rejected):
            raise ValueError(f"PreferenceBatch: {len(self.samples)} prompts, {len(self.chosen)} chosen and "
                             f"{len(self.rejected)} rejected responses (one of each per prompt)")

    def __len__(self) -> int:
        return len(self.samples)

    # The grouped forward scores G completions per prompt, contiguous, prompts in order; a pair is a
    # group of two. These three members are the only place that layout is written down.
    responses_per_prompt = 2

    @property
    def completions(self) -> list[list[int]]:
        """The responses in the order the learner scores them: each prompt's chosen, then its rejected."""
        return [ids for pair in zip(self.chosen, self.rejected) for ids in pair]

    @cached_property
    def rows(self) -> PairRows:
        """Where each pair's responses sit in the scored rows of :attr:`completions`."""
        first = torch.arange(len(self), dtype=torch.long) * self.responses_per_prompt
        return PairRows(chosen=first, rejected=first + 1)

    @property
    def chosen_tokens(self) -> int:
        return sum(len(ids) for ids in self.chosen)

    def select(self, start: int, stop: int) -> PreferenceBatch:
        """Pairs ``start:stop`` (a micro-batch)."""
        return PreferenceBatch(self.samples[start:stop], self.chosen[start:stop], self.rejected[start:stop])
