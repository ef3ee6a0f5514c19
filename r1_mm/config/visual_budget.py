"""How many frames, pixels and visual tokens a video gets: one computation for the loader (``media.py``),
the line a run logs for its first video, the recipe check at load, and ``r1-mm plan``.

Why one module: the whole-video budget used to be applied in the loader and estimated differently in
the planner, and its default (200,704 pixels for the whole video) silently shrank a recipe's stated
200,704 pixels *per frame* to 16-token thumbnails. The rule now, written once:

- ``media.video_max_pixels`` / ``video_min_pixels`` are the per-frame budget. When the recipe states
  ``video_max_pixels``, every frame gets it, whatever the frame count.
- ``media.video_total_pixels`` is an optional whole-video budget (pixels summed over the sampled
  frames). Alone, it is spread over the frames (a short video gets larger frames). Stated together with
  ``video_max_pixels``, it must hold the longest video the recipe samples at that size: if it cannot,
  the recipe is refused at load with one line naming both fields (no silent shrinking either way).
- Neither stated: ``DEFAULT_VIDEO_MAX_PIXELS`` per frame (16 tokens of 28 x 28 pixels).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Protocol


class MediaConfig(Protocol):
    """The fields of the recipe's ``media`` section the budget reads (``r1_mm.config.recipe.MediaConfig``
    has them): named here, so the recipe's check can call this module without the two importing each other."""

    fps: float
    frame_factor: int
    min_frames: int
    max_frames: int
    nframes: int | None
    video_min_pixels: int
    video_max_pixels: int | None
    video_total_pixels: int | None

DEFAULT_VIDEO_MAX_PIXELS = 28 * 28 * 16  # per frame, when the recipe states no video budget
PLAN_FACTOR = 28  # pixels per token side the planner assumes (Qwen-VL: 14-pixel patches merged 2 x 2)


def fit_to_budget(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Size closest to (height, width) with both sides multiples of ``factor`` and area in budget.

    The aspect ratio is kept as far as rounding allows. Patch-aligned sizes mean the processor
    does not resize again, so the learner and vLLM see identical pixels.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image has an empty side: {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio over 200 ({height}x{width})")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def choose_frame_count(total_frames: int, source_fps: float, cfg: MediaConfig) -> int:
    """Frames to keep: ``nframes`` if set, else ``fps`` x duration, clamped to [min_frames, max_frames].

    Rounded to a multiple of ``frame_factor`` (Qwen merges frame pairs into one temporal patch);
    never more than the video has, except that a video shorter than one temporal patch is padded
    by repeating frames.
    """
    ff = max(1, cfg.frame_factor)
    if cfg.nframes is not None:
        n = cfg.nframes
    else:
        duration = total_frames / source_fps if source_fps > 0 else total_frames
        n = duration * cfg.fps
        n = min(max(n, cfg.min_frames), cfg.max_frames)
    n = min(n, max(total_frames, ff))
    n = max(ff, int(math.floor(n / ff)) * ff)
    return n


def max_video_frames(cfg: MediaConfig) -> int:
    """The most frames the recipe samples from any video (the frame count of a very long one)."""
    return choose_frame_count(sys.maxsize, 1.0, cfg)


def frame_pixel_range(frames: int, cfg: MediaConfig) -> tuple[int, int]:
    """(min, max) pixels of each frame of a video sampled to ``frames`` frames (see the module rule)."""
    if cfg.video_max_pixels is not None:
        return cfg.video_min_pixels, cfg.video_max_pixels
    if cfg.video_total_pixels is not None:
        return cfg.video_min_pixels, max(cfg.video_min_pixels, cfg.video_total_pixels // max(frames, 1))
    return cfg.video_min_pixels, max(cfg.video_min_pixels, DEFAULT_VIDEO_MAX_PIXELS)


def budget_problem(cfg: MediaConfig) -> str | None:
    """One line naming both fields when the whole-video budget cannot hold the per-frame budget the
    recipe states at its largest frame count; None when the budgets agree."""
    if cfg.video_total_pixels is None:
        return None
    frames = max_video_frames(cfg)
    field, per_frame = (("media.video_max_pixels", cfg.video_max_pixels) if cfg.video_max_pixels is not None
                        else ("media.video_min_pixels", cfg.video_min_pixels))
    if frames * per_frame <= cfg.video_total_pixels:
        return None
    count = "media.nframes" if cfg.nframes is not None else "media.max_frames"
    return (f"media.video_total_pixels={cfg.video_total_pixels} cannot hold {frames} frames ({count}) x "
            f"{field}={per_frame} = {frames * per_frame} pixels: the whole-video budget would shrink the per-frame "
            f"budget; raise media.video_total_pixels to at least {frames * per_frame}, lower {field} or the "
            "frame count, or drop media.video_total_pixels")


@dataclass(frozen=True)
class VisualTokens:
    """The visual tokens of one video: frames x tokens per frame, frames merged in temporal patches."""

    frames: int
    tokens_per_frame: int  # one frame's grid of merged patches (height/factor x width/factor)
    frame_factor: int  # frames per temporal patch (Qwen-VL: 2)
    size: tuple[int, int] | None = None  # (height, width) in pixels, when known

    @property
    def temporal_patches(self) -> int:
        return math.ceil(self.frames / max(1, self.frame_factor))

    @property
    def total(self) -> int:
        return self.temporal_patches * self.tokens_per_frame

    def describe(self) -> str:
        size = f" of {self.size[0]}x{self.size[1]} pixels" if self.size else ""
        return (f"{self.frames} frames{size} = {self.temporal_patches} temporal patches ({self.frame_factor} frames "
                f"each) x {self.tokens_per_frame} tokens per frame = {self.total} visual tokens")


def video_tokens(frames: int, height: int, width: int, *, factor: int, frame_factor: int) -> VisualTokens:
    """Tokens of a video whose frames are ``height`` x ``width`` (multiples of ``factor``, as media.py sizes them)."""
    return VisualTokens(frames=frames, tokens_per_frame=(height // factor) * (width // factor),
                        frame_factor=frame_factor, size=(height, width))


def video_token_budget(cfg: MediaConfig, *, factor: int = PLAN_FACTOR) -> VisualTokens:
    """The most tokens one video can take under the recipe: its largest frame count, each frame at the
    per-frame maximum (the planner's worst case; a real video's aspect ratio can only give fewer)."""
    frames = max_video_frames(cfg)
    _, max_pixels = frame_pixel_range(frames, cfg)
    return VisualTokens(frames=frames, tokens_per_frame=max_pixels // (factor * factor), frame_factor=cfg.frame_factor)
