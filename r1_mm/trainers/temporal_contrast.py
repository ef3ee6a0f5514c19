"""T-GRPO (Video-R1): does the policy use temporal order? Compare against shuffled frames.

For each video prompt, extra completions are sampled with the frames shuffled. If the ordered
group answers correctly at least ``margin`` times as often as the shuffled group, correct ordered
completions earn ``bonus``. Image prompts are untouched.
"""

from __future__ import annotations

import random

import torch

from r1_mm.data.frame_views import select_frames, with_videos
from r1_mm.data.prompts import Sample


def has_video(sample: Sample) -> bool:
    return bool(sample.videos)


def shuffled_frames_sample(sample: Sample, processor, seed: int) -> Sample:
    """The same prompt with every video's frames in a random (non-identity when possible) order."""
    rng = random.Random(seed)
    videos = []
    for video in sample.videos:
        order = list(range(video.num_frames))
        for _ in range(10):
            rng.shuffle(order)
            if order != sorted(order) or len(order) < 2:
                break
        videos.append(select_frames(video, order, frame_factor=1))
    return with_videos(sample, processor, videos)


def temporal_bonus(correct_ordered: torch.Tensor, correct_shuffled: torch.Tensor, *, bonus: float,
                   margin: float) -> torch.Tensor:
    """Per ordered completion: ``bonus`` if it is correct and ordered accuracy >= margin * shuffled accuracy."""
    p_ordered = correct_ordered.float().mean()
    p_shuffled = correct_shuffled.float().mean()
    earned = bool(p_ordered >= margin * p_shuffled) and bool(p_ordered > 0)
    return correct_ordered.float() * (bonus if earned else 0.0)
