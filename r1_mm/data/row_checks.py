"""Checks of every row that need neither the model nor decoded media, run when the data loads.

Why every row, up front: the prompt stream prepares rows lazily, a batch at a time, so a row whose
``<image>`` marks do not match its images, whose media file is missing, whose text cannot be encoded,
or that holds more images than the vLLM engine takes per prompt used to stop the run when a batch
first drew it: after the model loaded, often after step 1, sometimes as a raw vLLM or tokenizer
traceback. Each check here reports the first offending row (file, index, id, field) and how many more
there are, in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from r1_mm.config.recipe import RecipeConfig
from r1_mm.data.loading import DataError
from r1_mm.data.prompts import build_messages, media_refs, row_id

URL_PREFIXES = ("http://", "https://", "data:")


def _first_of(rows: list[dict[str, Any]], source: str, problem: Callable[[dict[str, Any], int], str | None]) -> list[str]:
    """``problem(row, index)`` for every row; one message: the first row's problem and the count of others."""
    first, count = None, 0
    for i, row in enumerate(rows):
        found = problem(row, i)
        if found is not None:
            count += 1
            if first is None:
                first = (i, found)
    if first is None:
        return []
    i, found = first
    more = f" ({count - 1} more row(s) like it)" if count > 1 else ""
    return [f"{source}: row {i} (id {row_id(rows[i], i)}): {found}{more}"]


# ------------------------------------------------------------------------------------------------
# Text that cannot be encoded


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """(field path, text) of every string in a row's value, nested lists and mappings included."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for j, item in enumerate(value):
            yield from _strings(item, f"{where}[{j}]")


def _bad_text(row: dict[str, Any], index: int) -> str | None:
    """A lone surrogate (JSON ``"\\ud800"``) is a valid Python string but not UTF-8: the tokenizer and
    every log file that writes the row would fail on it."""
    for key, value in row.items():
        for where, text in _strings(value, str(key)):
            if text.isascii():
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                return (f"field '{where}' holds text that is not valid UTF-8 (lone surrogate "
                        f"{text[exc.start]!r} at character {exc.start}); fix or drop it in the data")
    return None


# ------------------------------------------------------------------------------------------------
# Prompts and their media placeholders


def _prompt_problem(data_cfg: Any) -> Callable[[dict[str, Any], int], str | None]:
    def problem(row: dict[str, Any], index: int) -> str | None:
        try:
            build_messages(row, index, data_cfg)
        except DataError as exc:
            text = str(exc)
            prefix = f"row {row_id(row, index)}: "
            return text[len(prefix):] if text.startswith(prefix) else text
        return None
    return problem


def _refs(row: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    try:
        return media_refs(row)
    except DataError:  # reported by the prompt check
        return [], []


# ------------------------------------------------------------------------------------------------
# Media files


def _file_refs(ref: Any) -> Iterator[str]:
    """Local file references inside one image or video reference (a video can be a list of frames)."""
    if isinstance(ref, (str, Path)):
        if not str(ref).startswith(URL_PREFIXES):
            yield str(ref)
    elif isinstance(ref, dict):
        if ref.get("bytes") is None and ref.get("path"):
            yield from _file_refs(ref["path"])
    elif isinstance(ref, (list, tuple)):
        for item in ref:
            yield from _file_refs(item)


def _missing_media(root: Path | None) -> Callable[[dict[str, Any], int], str | None]:
    def problem(row: dict[str, Any], index: int) -> str | None:
        images, videos = _refs(row)
        for ref in (*images, *videos):
            for name in _file_refs(ref):
                path = Path(name).expanduser()
                if not path.is_absolute() and root is not None:
                    path = root / path
                if not path.exists():
                    return (f"media file {path} does not exist (media.on_bad_media=error); fix the path or "
                            "data.media_root, or set media.on_bad_media=skip to leave such rows out")
        return None
    return problem


def _too_many_media(cfg: RecipeConfig) -> Callable[[dict[str, Any], int], str | None]:
    """vLLM's per-prompt media limits against a row's media, plus, in a tool recipe, the images its tools may add to
    the same prompt (tools.max_tool_calls x tools.max_images_per_call: a continuation carries them all)."""
    rollout, tools = cfg.rollout, cfg.tools
    limits = {"image": rollout.vllm_max_images_per_prompt, "video": rollout.vllm_max_videos_per_prompt}
    tool_images = tools.max_tool_calls * tools.max_images_per_call if tools.functions else 0

    def problem(row: dict[str, Any], index: int) -> str | None:
        images, videos = _refs(row)
        for kind, refs in (("image", images), ("video", videos)):
            if len(refs) > limits[kind]:
                return (f"{len(refs)} {kind}s in one prompt, over rollout.vllm_max_{kind}s_per_prompt="
                        f"{limits[kind]} (rollout.engine={rollout.engine}, vLLM refuses the prompt); raise the limit "
                        "or split the row")
        if tool_images and len(images) + tool_images > limits["image"]:
            return (f"{len(images)} image(s) in the prompt + up to {tool_images} tool images (tools.max_tool_calls "
                    f"{tools.max_tool_calls} x tools.max_images_per_call {tools.max_images_per_call}) is over "
                    f"rollout.vllm_max_images_per_prompt={limits['image']} (rollout.engine={rollout.engine}: vLLM "
                    "would refuse a trajectory's later turns); raise the limit or lower the tool limits")
        return None
    return problem


def row_problems(cfg: RecipeConfig, rows: list[dict[str, Any]], source: str, media_root: Path | None) -> list[str]:
    """Every check above that applies to the recipe, each reported once (first row and count)."""
    found = _first_of(rows, source, _bad_text) + _first_of(rows, source, _prompt_problem(cfg.data))
    if cfg.media.on_bad_media == "error":
        found += _first_of(rows, source, _missing_media(media_root))
    if cfg.rollout.engine.startswith("vllm"):
        found += _first_of(rows, source, _too_many_media(cfg))
    return found
