"""Rows -> chat messages -> prompt text and model inputs, with media decoded once.

The prompt is rendered by the processor's own chat template, and its length is measured with the
processor (visual tokens included). A prompt over ``max_prompt_length`` is never truncated: cutting
it would cut visual tokens out of the middle of an image (a known bug elsewhere); it is dropped or
rejected by policy instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from r1_mm.config.recipe import DataConfig, MediaConfig
from r1_mm.config.visual_budget import VisualTokens, video_tokens
from r1_mm.data.loading import DataError
from r1_mm.data.media import Video, load_image, load_video

PROMPT_KEYS = ("prompt", "problem", "question")
IMAGE_MARK, VIDEO_MARK = "<image>", "<video>"


class PromptTooLongError(DataError):
    """A prompt longer than ``data.max_prompt_length`` under the ``error`` policy."""


@dataclass
class Sample:
    """One prompt, ready for rollout, learner and critic (all share these decoded media)."""

    index: int  # position in the source file
    row_id: str
    row: dict[str, Any]  # every original column: rewards receive them
    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    videos: list[Video] = field(default_factory=list)
    prompt_text: str = ""
    num_prompt_tokens: int = 0
    inputs: Any = None  # the processor's output for this prompt alone (BatchFeature)
    media_root: Path | None = None  # where the row's relative media references resolve (tools open them again)


def row_id(row: dict[str, Any], index: int) -> str:
    return str(row.get("id", index))


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def media_refs(row: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """Image and video references of a row, from ``image``/``images`` and ``video``/``videos``, or from
    ``path`` + ``data_type`` (Video-R1-260k's columns)."""
    images = _as_list(row.get("image")) + _as_list(row.get("images"))
    video = row.get("video")
    if video is None:
        videos = []
    elif isinstance(video, (list, tuple)) and video and not isinstance(video[0], (list, tuple)):
        videos = [video]  # one video given as a list of frames
    else:
        videos = _as_list(video)
    videos += _as_list(row.get("videos"))
    if not images and not videos and row.get("path") is not None:
        # Video-R1's schema: one file in `path`, its kind in `data_type`
        kind = row.get("data_type")
        if kind == "image":
            images = [row["path"]]
        elif kind == "video":
            videos = [row["path"]]
        else:
            raise DataError(f"row {row.get('id', row.get('problem_id', '?'))}: column 'path' needs "
                            f"data_type 'image' or 'video', got {kind!r}")
    return images, videos


def _question_text(row: dict[str, Any], rid: str) -> Any:
    for key in PROMPT_KEYS:
        if row.get(key) is not None:
            return row[key]
    raise DataError(f"row {rid}: no prompt; expected one of the columns {', '.join(PROMPT_KEYS)}")


def _text_to_parts(text: str, n_images: int, n_videos: int, rid: str) -> list[dict[str, Any]]:
    """Plain text -> content parts; ``<image>``/``<video>`` marks place media, else media go first."""
    marks_i, marks_v = text.count(IMAGE_MARK), text.count(VIDEO_MARK)
    if marks_i == 0 and marks_v == 0:
        parts = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
        return [dict(p) for p in parts] + [{"type": "text", "text": text}]
    if marks_i != n_images or marks_v != n_videos:
        raise DataError(f"row {rid}: prompt has {marks_i} {IMAGE_MARK} and {marks_v} {VIDEO_MARK} marks but the "
                        f"row has {n_images} image(s) and {n_videos} video(s)")
    parts: list[dict[str, Any]] = []
    rest = text
    while rest:
        positions = [(rest.find(m), m) for m in (IMAGE_MARK, VIDEO_MARK) if rest.find(m) >= 0]
        if not positions:
            parts.append({"type": "text", "text": rest})
            break
        pos, mark = min(positions)
        if pos > 0:
            parts.append({"type": "text", "text": rest[:pos]})
        parts.append({"type": "image" if mark == IMAGE_MARK else "video"})
        rest = rest[pos + len(mark):]
    return parts


def _count_media_parts(messages: list[dict[str, Any]]) -> tuple[int, int]:
    n_i = n_v = 0
    for message in messages:
        if isinstance(message.get("content"), list):
            for part in message["content"]:
                n_i += part.get("type") == "image"
                n_v += part.get("type") == "video"
    return n_i, n_v


def build_messages(row: dict[str, Any], index: int, cfg: DataConfig) -> list[dict[str, Any]]:
    """Chat messages with media placeholders, the recipe's system prompt and answer-format instruction."""
    rid = row_id(row, index)
    images, videos = media_refs(row)
    question = _question_text(row, rid)
    if isinstance(question, str):
        text = question
        if row.get("options"):
            text += "\n" + "\n".join(str(o) for o in row["options"])
        messages = [{"role": "user", "content": _text_to_parts(text, len(images), len(videos), rid)}]
    elif isinstance(question, list) and all(isinstance(m, dict) and "role" in m for m in question):
        messages = copy.deepcopy(question)
        for m in messages:
            if isinstance(m.get("content"), str):
                m["content"] = [{"type": "text", "text": m["content"]}]
        n_i, n_v = _count_media_parts(messages)
        if (n_i, n_v) == (0, 0) and (images or videos):
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise DataError(f"row {rid}: conversational prompt has no user message")
            first_user["content"] = ([{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
                                     + first_user["content"])
        elif (n_i, n_v) != (len(images), len(videos)):
            raise DataError(f"row {rid}: prompt has {n_i} image and {n_v} video placeholders but the row has "
                            f"{len(images)} image(s) and {len(videos)} video(s)")
    else:
        raise DataError(f"row {rid}: prompt must be a string or a list of {{role, content}} messages")
    instruction = (cfg.format_instruction or "") + cfg.format_instruction_by_type.get(str(row.get("problem_type")), "")
    if instruction:
        last_user = [m for m in messages if m["role"] == "user"][-1]
        last_user["content"] = last_user["content"] + [{"type": "text", "text": "\n" + instruction}]
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": cfg.system_prompt}]})
    return messages


def visual_factor(processor: Any) -> int:
    """Side multiple that the processor's patching needs (patch x merge for Qwen-VL); 1 if unknown."""
    ip = getattr(processor, "image_processor", None)
    patch, merge = getattr(ip, "patch_size", None), getattr(ip, "merge_size", None)
    if isinstance(patch, int) and isinstance(merge, int):
        return patch * merge
    return 1


# Processors whose input check counts videos per prompt text (a list of videos for each text), not one flat list:
# SmolVLMProcessor read a flat list as one video per frame ("The number of videos in the text [1] and videos [16]")
VIDEOS_PER_TEXT = ("SmolVLMProcessor",)


def videos_argument(processor: Any, texts: list[str], frames: list[Any]) -> list[Any]:
    """The ``videos`` argument in the layout this processor checks: flat, or one list per text (in order,
    as many as the text has video placeholders)."""
    if type(processor).__name__ not in VIDEOS_PER_TEXT:
        return frames
    token, per_text, start = getattr(processor, "video_token", "<video>"), [], 0
    for text in texts:
        count = text.count(token)
        per_text.append(frames[start:start + count])
        start += count
    return per_text


def encode_prompts(processor: Any, texts: list[str], images: list[Image.Image], videos: list[Video],
                   *, padding_side: str = "left") -> Any:
    """Run the processor on prompts whose media were already budgeted (no second resize)."""
    kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos_argument(processor, texts, [v.frames for v in videos])
        kwargs["video_metadata"] = [v.metadata() for v in videos]
    if visual_factor(processor) > 1:
        kwargs["do_resize"] = False  # media.py already produced patch-aligned sizes within budget
    tokenizer = getattr(processor, "tokenizer", processor)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        return processor(**kwargs)
    finally:
        tokenizer.padding_side = old_side


class PromptBuilder:
    """Turns a row into a :class:`Sample`: decodes media, renders the template, measures the prompt."""

    def __init__(self, processor: Any, data_cfg: DataConfig, media_cfg: MediaConfig, media_root: Path | None,
                 tools: list[dict[str, Any]] | None = None):
        """``tools``: the function schemas an agentic recipe's model is shown (the chat template renders them)."""
        self.processor = processor
        self.data_cfg = data_cfg
        self.media_cfg = media_cfg
        self.media_root = media_root
        self.tools = tools or None
        self.factor = visual_factor(processor)

    def render(self, messages: list[dict[str, Any]]) -> str:
        extra = {"tools": self.tools} if self.tools else {}
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)

    def decode_media(self, row: dict[str, Any], index: int) -> tuple[list[Image.Image], list[Video]]:
        rid = row_id(row, index)
        image_refs, video_refs = media_refs(row)
        images = [load_image(r, self.media_cfg, factor=self.factor, root=self.media_root, row=rid) for r in image_refs]
        fps = row.get("video_fps")
        videos = [load_video(r, self.media_cfg, factor=self.factor, root=self.media_root, row=rid,
                             frames_fps=float(fps) if fps else None) for r in video_refs]
        return images, videos

    def video_tokens(self, video: Video) -> VisualTokens:
        """Frames x tokens per frame of a decoded video, as this processor patches it."""
        patching = getattr(self.processor, "video_processor", None) or getattr(self.processor, "image_processor", None)
        temporal = getattr(patching, "temporal_patch_size", None)
        return video_tokens(video.num_frames, *video.frames.shape[1:3], factor=self.factor,
                            frame_factor=temporal if isinstance(temporal, int) else self.media_cfg.frame_factor)

    def prepare(self, row: dict[str, Any], index: int) -> Sample:
        """Raises MediaError, DataError or PromptTooLongError (the caller applies the skip policy)."""
        rid = row_id(row, index)
        messages = build_messages(row, index, self.data_cfg)
        images, videos = self.decode_media(row, index)
        text = self.render(messages)
        inputs = encode_prompts(self.processor, [text], images, videos)
        n_tokens = int(inputs["input_ids"].shape[1])
        if n_tokens > self.data_cfg.max_prompt_length:
            raise PromptTooLongError(
                f"row {rid}: prompt is {n_tokens} tokens (visual tokens included), over "
                f"data.max_prompt_length={self.data_cfg.max_prompt_length}; it is not truncated because that "
                "would cut visual tokens. Raise max_prompt_length, lower media.max_pixels/max_frames, or set "
                "data.on_long_prompt=drop")
        return Sample(index=index, row_id=rid, row=row, messages=messages, images=images, videos=videos,
                      prompt_text=text, num_prompt_tokens=n_tokens, inputs=inputs, media_root=self.media_root)
