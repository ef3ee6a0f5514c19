"""``r1-mm tools check``: call a tool on a real row before a run depends on it.

It prints what the model would get back (the text, each image's size) and reports problems in plain
words: a name that does not resolve, recipe kwargs the tool does not take, arguments its schema refuses, a
tool that raises. With ``--out`` the returned images are written as PNG files to look at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from r1_mm.config.recipe import DataConfig, MediaConfig
from r1_mm.data.loading import default_media_root, map_columns, read_rows
from r1_mm.data.media import load_image, load_video
from r1_mm.data.prompts import Sample, media_refs, row_id
from r1_mm.jobs.rewards_check import CheckReport
from r1_mm.tools.base import ToolArgumentError
from r1_mm.tools.registry import ToolError, get, option_problems
from r1_mm.tools.row_media import tool_media

QWEN_FACTOR = 28  # patch 14 x merge 2: how Qwen-VL processors align a budgeted image (the default shown size)


def check_tool(name: str, data: str | Path, *, arguments: dict[str, Any], row: int = 0,
               kwargs: dict[str, Any] | None = None, columns: dict[str, str] | None = None,
               media: MediaConfig | None = None, factor: int = QWEN_FACTOR, out: Path | None = None) -> CheckReport:
    """Call tool ``name`` with ``arguments`` on row ``row`` of ``data``. The images are shown to the tool at
    the size ``media``'s pixel budget gives them with ``factor`` (Qwen-VL's 28 by default)."""
    report = CheckReport()
    try:
        entry = get(name)
    except ToolError as exc:
        report.problems.append(str(exc))
        return report
    report.lines.append(f"tool {entry.name!r}: {getattr(entry.fn, '__module__', '?')}:{entry.fn.__qualname__}")
    report.problems += option_problems(entry, dict(kwargs or {}), f"tool '{entry.name}'")
    table = map_columns(read_rows(data), DataConfig(columns=dict(columns or {})), str(data))
    if not 0 <= row < len(table):
        report.problems.append(f"{data} has {len(table)} row(s); --row {row} is not one of them")
    if report.problems:
        return report
    media = media or MediaConfig()
    root = default_media_root(data)
    record = table[row]
    rid = row_id(record, row)
    image_refs, video_refs = media_refs(record)
    sample = Sample(index=row, row_id=rid, row=record, messages=[],
                    images=[load_image(ref, media, factor=factor, root=root, row=rid) for ref in image_refs],
                    videos=[load_video(ref, media, factor=factor, root=root, row=rid) for ref in video_refs])
    given = tool_media(sample, root)
    for i, (original, shown) in enumerate(zip(given.images, given.shown_sizes)):
        report.lines.append(f"  image {i}: {original.size[0]}x{original.size[1]} px, shown at {shown[0]}x{shown[1]}")
    for i, video in enumerate(given.videos):
        report.lines.append(f"  video {i}: {video.duration:.2f} s at {video.source_fps:g} fps")
    try:
        result = entry.with_kwargs(dict(kwargs or {}))(given, arguments)
    except ToolArgumentError as exc:
        report.problems.append(f"the arguments are refused (the model would read this): {exc}")
        return report
    except Exception as exc:
        report.problems.append(f"the tool raised {type(exc).__name__}: {exc}")
        return report
    report.lines.append(f"  text: {result.text}")
    for i, image in enumerate(result.images):
        line = f"  returned image {i}: {image.size[0]}x{image.size[1]} px"
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"{entry.name}-row{rid}-{i}.png"
            image.save(path)
            line += f" -> {path}"
        report.lines.append(line)
    return report
