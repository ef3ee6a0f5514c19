"""Images and videos in, pixel-budgeted PIL images and frame arrays out.

One decoder serves rollout, learner and critic, so all three see the same pixels: budgets are
applied here, explicitly, from recipe fields (never constants hidden in a processor), and the
sizes produced are already multiples of the model's patch factor so the processor's own resize
is a no-op.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from r1_mm.config.recipe import MediaConfig
from r1_mm.config.visual_budget import choose_frame_count, fit_to_budget, frame_pixel_range

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class MediaError(ValueError):
    """A media reference that cannot be decoded; the message names the row and the file."""

    def __init__(self, reason: str, *, source: str, row: str | int | None = None):
        self.reason, self.source, self.row = reason, source, row
        where = f"row {row}: " if row is not None else ""
        super().__init__(f"{where}cannot load media '{source}': {reason}")


@dataclass
class Video:
    """Sampled frames of one video plus the timing the model needs (M-RoPE uses seconds per frame)."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    timestamps: list[float]  # seconds, one per frame
    sample_fps: float  # frames kept per second of video
    source_fps: float
    duration: float  # seconds
    source: str = "<frames>"
    source_indices: list[int] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    def metadata(self) -> dict[str, Any]:
        """Metadata in the form transformers' video processors and vLLM accept."""
        return {
            "fps": self.source_fps,
            "duration": self.duration,
            "total_num_frames": int(round(self.duration * self.source_fps)) or self.num_frames,
            "frames_indices": list(self.source_indices) or list(range(self.num_frames)),
            "video_backend": "pyav",
        }


# ----------------------------------------------------------------------------------------------
# Pixel budgets (the arithmetic lives in visual_budget.py, shared with the recipe check and the planner)


def resize_image(img: Image.Image, *, factor: int, min_pixels: int, max_pixels: int) -> Image.Image:
    h, w = fit_to_budget(img.height, img.width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    if (h, w) == (img.height, img.width):
        return img
    return img.resize((w, h), Image.Resampling.BICUBIC)


# ----------------------------------------------------------------------------------------------
# Images


def _resolve(ref: str, root: Path | None) -> Path:
    path = Path(ref).expanduser()
    if not path.is_absolute() and root is not None:
        path = root / path
    return path


def open_image(ref: Any, *, root: Path | None = None, row: str | int | None = None) -> Image.Image:
    """Decode an image reference: a path, PIL image, raw bytes, base64 data URI or {"bytes"/"path"}."""
    source = "<image>"
    try:
        if isinstance(ref, Image.Image):
            img = ref
        elif isinstance(ref, (bytes, bytearray)):
            source = "<bytes>"
            img = Image.open(io.BytesIO(ref))
        elif isinstance(ref, dict):
            if ref.get("bytes") is not None:
                return open_image(ref["bytes"], root=root, row=row)
            if ref.get("path"):
                return open_image(ref["path"], root=root, row=row)
            raise MediaError("mapping has neither 'bytes' nor 'path'", source=str(ref)[:80], row=row)
        elif isinstance(ref, str) and ref.startswith("data:image"):
            source = ref[:40] + "..."
            img = Image.open(io.BytesIO(base64.b64decode(ref.split(",", 1)[1])))
        elif isinstance(ref, (str, Path)):
            path = _resolve(str(ref), root)
            source = str(path)
            if not path.exists():
                raise MediaError("file not found", source=source, row=row)
            img = Image.open(path)
        else:
            raise MediaError(f"unsupported image reference of type {type(ref).__name__}", source=str(ref)[:80], row=row)
        img.load()
        return img.convert("RGB")
    except MediaError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt data
        raise MediaError(f"{type(exc).__name__}: {exc}", source=source, row=row) from exc


def load_image(ref: Any, cfg: MediaConfig, *, factor: int, root: Path | None = None,
               row: str | int | None = None) -> Image.Image:
    img = open_image(ref, root=root, row=row)
    try:
        return resize_image(img, factor=factor, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    except ValueError as exc:
        raise MediaError(str(exc), source=str(ref)[:200], row=row) from exc


# ----------------------------------------------------------------------------------------------
# Videos


def sample_indices(total_frames: int, n: int) -> list[int]:
    """Evenly spaced frame indices, first and last frame included."""
    if total_frames <= 0:
        raise ValueError("video has no frames")
    return [int(round(x)) for x in np.linspace(0, total_frames - 1, n)]


# frames decoded and seeks made since import (benchmarks and tests read them: how much work a video cost)
DECODE_STATS: Counter[str] = Counter()


@dataclass
class _Stream:
    """What a container says of its first video stream, read without decoding a frame."""

    total_frames: int
    fps: float
    time_base: float
    start_pts: int
    keyframes: list[tuple[int, int]]  # (frame index, pts) of every keyframe, in order

    def index_of(self, pts: int) -> int:
        return int(round((pts - self.start_pts) * self.time_base * self.fps))


def _probe(container: Any, stream: Any) -> _Stream:
    """Frame count and rate from the metadata; keyframe positions from one demux pass (packets are
    read, never decoded), which is what makes seeking to a keyframe exact."""
    fps = float(stream.average_rate or stream.guessed_rate or 0) or 0.0
    time_base = float(stream.time_base) if stream.time_base else 0.0
    start = int(stream.start_time or 0)
    packets = 0
    keyframes: list[int] = []
    for packet in container.demux(stream):
        if not packet.size:
            continue
        packets += 1
        if packet.is_keyframe and packet.pts is not None:
            keyframes.append(int(packet.pts))
    container.seek(0)
    total = int(stream.frames or 0) or packets
    meta = _Stream(total_frames=total, fps=fps if fps > 0 else 1.0, time_base=time_base, start_pts=start, keyframes=[])
    if fps > 0 and time_base > 0:
        meta.keyframes = sorted((meta.index_of(pts), pts) for pts in keyframes)
    return meta


def _decode_indices(container: Any, stream: Any, meta: _Stream, wanted: list[int]) -> dict[int, np.ndarray]:
    """The frames at ``wanted`` (sorted, repeats allowed) and no others kept in memory.

    Frames are counted as a full decode counts them. When the keyframe before the next wanted frame
    lies ahead of the decoder, it seeks there (decoding from a keyframe gives the same pixels) and
    resumes the count from the keyframe's index.
    """
    kept: dict[int, np.ndarray] = {}
    frames = container.decode(stream)
    index = -1
    last = None
    for target in sorted(set(wanted)):
        keyframe = next(((i, pts) for i, pts in reversed(meta.keyframes) if i <= target), None)
        if keyframe is not None and keyframe[0] > index + 1:
            container.seek(keyframe[1], stream=stream, backward=True, any_frame=False)
            DECODE_STATS["seeks"] += 1
            frames = container.decode(stream)
            index = keyframe[0] - 1
        for frame in frames:
            DECODE_STATS["frames_decoded"] += 1
            index += 1
            last = frame
            if index >= target:
                kept[target] = frame.to_ndarray(format="rgb24")
                break
        else:  # the stream ended before the metadata's last frame: keep the last one decoded
            if last is None:
                break
            kept[target] = last.to_ndarray(format="rgb24")
    return kept


def _frames_of_mp4(path: Path, cfg: MediaConfig) -> tuple[list[np.ndarray], list[int], int, float]:
    """Sampled frames of a video file, decoded one at a time: memory holds only the kept ones."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        meta = _probe(container, stream)
        n = choose_frame_count(meta.total_frames, meta.fps, cfg)
        idx = sample_indices(meta.total_frames, n)
        kept = _decode_indices(container, stream, meta, idx)
    if not kept:
        raise ValueError("no decodable video frames")
    return [kept[i] for i in idx], idx, meta.total_frames, meta.fps


def _frames_from_refs(refs: Sequence[Any], root: Path | None, row: str | int | None) -> list[np.ndarray]:
    out = []
    for ref in refs:
        if isinstance(ref, np.ndarray):
            arr = ref
            if arr.ndim != 3 or arr.shape[-1] != 3:
                raise MediaError(f"frame array must be (H, W, 3), got {arr.shape}", source="<frames>", row=row)
            out.append(arr.astype(np.uint8))
        else:
            out.append(np.asarray(open_image(ref, root=root, row=row)))
    return out


def load_video(ref: Any, cfg: MediaConfig, *, factor: int, root: Path | None = None,
               row: str | int | None = None, frames_fps: float | None = None) -> Video:
    """Decode a video (mp4 path, folder of frames, list of frames or (T,H,W,3) array) and sample it.

    ``frames_fps`` is the frame rate of a folder or list of frames (they carry none); it defaults
    to ``cfg.fps``, i.e. the frames are taken to be already sampled at the recipe's rate.
    """
    source = "<frames>"
    try:
        if isinstance(ref, (str, Path)) and not str(ref).startswith("data:"):
            path = _resolve(str(ref), root)
            source = str(path)
            if not path.exists():
                raise MediaError("file not found", source=source, row=row)
            if path.is_dir():
                files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                if not files:
                    raise MediaError("folder holds no image frames", source=source, row=row)
                frames = _frames_from_refs(files, None, row)
                fps = frames_fps or cfg.fps
            else:
                sampled, idx, total, fps = _frames_of_mp4(path, cfg)
                return _video_from_sampled(sampled, idx, total, fps, cfg, factor=factor, source=source, row=row)
        elif isinstance(ref, np.ndarray) and ref.ndim == 4:
            frames, fps = list(ref), frames_fps or cfg.fps
        elif isinstance(ref, (list, tuple)):
            if not ref:
                raise MediaError("empty frame list", source=source, row=row)
            frames, fps = _frames_from_refs(ref, root, row), frames_fps or cfg.fps
        else:
            raise MediaError(f"unsupported video reference of type {type(ref).__name__}", source=str(ref)[:80], row=row)
    except MediaError:
        raise
    except Exception as exc:  # PyAV / PIL errors on corrupt data
        raise MediaError(f"{type(exc).__name__}: {exc}", source=source, row=row) from exc
    total = len(frames)
    idx = sample_indices(total, choose_frame_count(total, fps, cfg))
    return _video_from_sampled([frames[i] for i in idx], idx, total, fps, cfg, factor=factor, source=source, row=row)


def decode_span(ref: Any, start: float, end: float, count: int, *, root: Path | None = None,
                frames_fps: float | None = None, row: str | int | None = None) -> tuple[list[np.ndarray], list[float]]:
    """``count`` evenly spaced frames of the span [start, end] seconds of a video (an mp4 decoded at those
    frames only, or a folder / list of frames at ``frames_fps``), at their source resolution, with their
    times. What a tool re-watching a stretch of video decodes: the prompt's frames were sampled for the
    whole video and budgeted for it, these for the span."""
    if count < 1 or not end >= start >= 0:
        raise ValueError(f"a span needs 0 <= start <= end and count >= 1, got [{start}, {end}] x {count}")
    source = "<frames>"
    try:
        if isinstance(ref, (str, Path)) and not Path(str(ref)).is_dir() and not str(ref).startswith("data:"):
            import av

            path = _resolve(str(ref), root)
            source = str(path)
            if not path.exists():
                raise MediaError("file not found", source=source, row=row)
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                meta = _probe(container, stream)
                fps, total = meta.fps, meta.total_frames
                wanted = _span_indices(start, end, count, fps, total)
                kept = _decode_indices(container, stream, meta, wanted)
            return [kept[i] for i in wanted], [i / fps for i in wanted]
        if isinstance(ref, (str, Path)):
            path = _resolve(str(ref), root)
            source = str(path)
            frames_refs: Sequence[Any] = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif isinstance(ref, np.ndarray) and ref.ndim == 4:
            frames_refs = list(ref)
        else:
            frames_refs = list(ref)
        fps = float(frames_fps or 1.0)
        wanted = _span_indices(start, end, count, fps, len(frames_refs))
        return _frames_from_refs([frames_refs[i] for i in wanted], root, row), [i / fps for i in wanted]
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"{type(exc).__name__}: {exc}", source=source, row=row) from exc


def _span_indices(start: float, end: float, count: int, fps: float, total: int) -> list[int]:
    if total <= 0:
        raise ValueError("video has no frames")
    first = min(total - 1, int(round(start * fps)))
    last = max(first, min(total - 1, int(round(end * fps))))
    return sorted({int(round(x)) for x in np.linspace(first, last, count)})


def _video_from_sampled(sampled: list[np.ndarray], idx: list[int], total: int, fps: float, cfg: MediaConfig, *,
                        factor: int, source: str, row: str | int | None) -> Video:
    """The sampled frames resized to the recipe's per-frame budget, with their timing."""
    n = len(idx)
    min_px, max_px = frame_pixel_range(n, cfg)
    h0, w0 = sampled[0].shape[:2]
    try:
        h, w = fit_to_budget(h0, w0, factor=factor, min_pixels=min_px, max_pixels=max_px)
    except ValueError as exc:
        raise MediaError(str(exc), source=source, row=row) from exc
    kept = [frame if frame.shape[:2] == (h, w) else
            np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.BICUBIC)) for frame in sampled]
    duration = total / fps
    return Video(
        frames=np.stack(kept).astype(np.uint8),
        timestamps=[i / fps for i in idx],
        sample_fps=n / duration if duration > 0 else fps,
        source_fps=fps,
        duration=duration,
        source=source,
        source_indices=idx,
    )


def media_preview(sample: Any, max_frames: int = 4) -> Any:
    """The prompt's first image, or a strip of up to ``max_frames`` evenly spaced video frames (PIL)."""
    import numpy as np
    from PIL import Image

    if getattr(sample, "images", None):
        return sample.images[0]
    if getattr(sample, "videos", None):
        frames = sample.videos[0].frames
        pick = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).astype(int)
        return Image.fromarray(np.concatenate([frames[i] for i in pick], axis=1))
    return None
