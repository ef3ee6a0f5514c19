"""Other views of a video prompt: the same question over a subset or a reordering of its frames.

T-GRPO asks about shuffled frames; TPO about one segment, the video without it, or a sparse subset.
Frames keep their source indices, so the model's timing (metadata, M-RoPE seconds) stays truthful.
"""

from __future__ import annotations

import copy

import numpy as np

from r1_mm.data.media import Video
from r1_mm.data.prompts import Sample, encode_prompts


def select_frames(video: Video, indices: list[int], frame_factor: int = 2) -> Video:
    """The frames at ``indices`` (in that order), trimmed to a multiple of ``frame_factor``."""
    keep = len(indices) - len(indices) % frame_factor if len(indices) >= frame_factor else len(indices)
    if keep == 0:
        raise ValueError("a frame view needs at least one frame")
    chosen = list(indices[:keep])
    view = copy.copy(video)
    view.frames = video.frames[np.array(chosen)]
    view.timestamps = [video.timestamps[i] for i in chosen] if video.timestamps else []
    view.source_indices = [video.source_indices[i] for i in chosen] if video.source_indices else chosen
    return view


def with_videos(sample: Sample, processor, videos: list[Video]) -> Sample:
    """The sample with other videos (same text and images), re-encoded for the learner."""
    out = copy.copy(sample)
    out.videos = videos
    out.inputs = encode_prompts(processor, [sample.prompt_text], sample.images, videos)
    return out


def segment_split(video: Video, start: float, end: float) -> tuple[list[int], list[int]]:
    """Indices of frames inside [start, end] seconds and outside it."""
    inside = [i for i, t in enumerate(video.timestamps) if start <= t <= end]
    outside = [i for i in range(video.num_frames) if i not in set(inside)]
    return inside, outside


def sparse_indices(video: Video, keep_fraction: float) -> list[int]:
    """Evenly spaced frames, ``keep_fraction`` of them (at least two)."""
    n = max(2, int(round(video.num_frames * keep_fraction)))
    return sorted({int(i) for i in np.linspace(0, video.num_frames - 1, n)})
