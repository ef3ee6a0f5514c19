"""The :class:`ToolMedia` of a prompt: what a tool may read of the row it was called for.

Images are opened again from the row's references at full resolution (the prompt's copies went through the
pixel budget); the size the model saw each at comes from the prompt's copies. A video is handed over as its
reference and timing, decoded again only if a tool asks for a span.
"""

from __future__ import annotations

from pathlib import Path

from r1_mm.data.media import open_image
from r1_mm.data.prompts import Sample, media_refs
from r1_mm.tools.base import ToolMedia, VideoSource


def tool_media(sample: Sample, root: Path | None) -> ToolMedia:
    """``root``: the data's media root (relative references resolve against it, as when the prompt loaded)."""
    image_refs, video_refs = media_refs(sample.row)
    images = tuple(open_image(ref, root=root, row=sample.row_id) for ref in image_refs)
    shown = tuple(im.size for im in sample.images)
    videos = tuple(
        VideoSource(ref=ref, root=root, duration=float(video.duration), source_fps=float(video.source_fps),
                    prompt_timestamps=tuple(float(t) for t in video.timestamps))
        for ref, video in zip(video_refs, sample.videos))
    return ToolMedia(images=images, shown_sizes=shown, videos=videos, row_id=sample.row_id)
