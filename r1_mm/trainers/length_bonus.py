"""Video-R1's length control: reward correct answers whose reasoning is neither terse nor rambling.

Video-R1 adds this on top of (T-)GRPO because rule rewards alone let the thinking collapse to a few
tokens. The bonus only applies when more than one completion of a group is correct, so a lone
correct answer is never penalised relative to others for its length.
"""

from __future__ import annotations

import torch


def length_band_bonus(correct: torch.Tensor, lengths: torch.Tensor, *, bonus: float, min_tokens: int,
                      max_tokens: int, min_correct: int = 2) -> torch.Tensor:
    """Per completion of one group: ``bonus`` if it is correct, its token count is within
    [min_tokens, max_tokens] and at least ``min_correct`` completions of the group are correct."""
    if int(correct.sum()) < min_correct:
        return torch.zeros(correct.shape, dtype=torch.float32)
    in_band = (lengths >= min_tokens) & (lengths <= max_tokens)
    return (correct & in_band).float() * bonus
