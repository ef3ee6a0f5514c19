"""``video_frames``: look again at a stretch of one of the row's videos, at more frames per second than the
prompt's sampling gave it. The frames are decoded from the source (an mp4 is decoded at those frames only)
and returned as images, with their times in the text so the model can tie what it sees to when."""

from __future__ import annotations

from typing import Any

from r1_mm.data.media import decode_span
from r1_mm.tools.base import ToolArgumentError, ToolMedia, ToolResult
from r1_mm.tools.registry import tool

PARAMETERS = {
    "properties": {
        "start": {"type": "number", "description": "start of the stretch, in seconds from the video's beginning"},
        "end": {"type": "number", "description": "end of the stretch, in seconds"},
        "num_frames": {"type": "integer", "description": "how many evenly spaced frames to return"},
        "video_index": {"type": "integer", "description": "which video of the question (0 = the first); default 0"},
    },
    "required": ["start", "end"],
}


@tool("video_frames", description="Fetch frames of a time span of the video, with their timestamps.",
      parameters=PARAMETERS)
def video_frames(media: ToolMedia, start: float, end: float, num_frames: int | None = None, video_index: int = 0, *,
                 max_frames: int = 8, default_frames: int = 4, **_: Any) -> ToolResult:
    """``max_frames``: the most frames one call returns (the recipe's limit, told to the model when it asks
    for more); ``default_frames``: when the call gives no ``num_frames``."""
    if not media.videos:
        raise ToolArgumentError("video_frames: this question has no video")
    if not 0 <= video_index < len(media.videos):
        raise ToolArgumentError(f"video_frames: video_index must be 0..{len(media.videos) - 1}, got {video_index}")
    video = media.videos[video_index]
    if not 0 <= start < end:
        raise ToolArgumentError(f"video_frames: need 0 <= start < end, got start={start}, end={end}")
    if start >= video.duration:
        raise ToolArgumentError(f"video_frames: start={start} s is past the video's end ({video.duration:.2f} s)")
    count = default_frames if num_frames is None else num_frames
    if not 1 <= count <= max_frames:
        raise ToolArgumentError(f"video_frames: num_frames must be 1..{max_frames}, got {count}")
    end = min(end, video.duration)
    frames, times = decode_span(video.ref, start, end, count, root=video.root, frames_fps=video.source_fps,
                                row=media.row_id)
    from PIL import Image

    stamps = ", ".join(f"{t:.2f} s" for t in times)
    return ToolResult(text=f"{len(frames)} frame(s) of video {video_index} at {stamps}.",
                      images=[Image.fromarray(f) for f in frames])
