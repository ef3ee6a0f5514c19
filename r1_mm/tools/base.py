"""What a tool is, what it receives and what it returns: the types every tool plugin and the agentic
rollout share.

A tool is a plain function ``fn(media: ToolMedia, **arguments) -> ToolResult`` registered with a JSON schema
of its arguments (the chat template shows the schema to the model; the arguments the model writes are
checked against it before the function runs, so a tool author never parses a malformed call).

Why the row's media and not the prompt's images: the prompt's images went through the recipe's pixel
budget, which is what makes a small detail unreadable; a zoom has to cut from the original. So a tool
gets the originals (``ToolMedia.images``), the size each was shown at (``shown_sizes``: a model's
absolute coordinates refer to that), and a video's source and decode settings (``ToolMedia.videos``) to
decode other frames than the prompt's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


class ToolArgumentError(ValueError):
    """The model's arguments are wrong (out of range, missing, of the wrong type): the message goes back to
    the model as the call's result, so it should say what a right call looks like."""


@dataclass(frozen=True)
class VideoSource:
    """One video of the row as a tool can decode it again: the reference the row gives (a file, a folder
    or a list of frames) resolved against the data's media root, its frame rate when it carries none, and
    the prompt's own sampled frame times (so a tool can say what the model has already seen)."""

    ref: Any
    root: Path | None
    duration: float
    source_fps: float
    prompt_timestamps: tuple[float, ...] = ()


@dataclass(frozen=True)
class ToolMedia:
    """The media of the row a call was made for."""

    images: tuple[Image.Image, ...] = ()  # the row's images at their original resolution
    shown_sizes: tuple[tuple[int, int], ...] = ()  # (width, height) of each image as the model saw it
    videos: tuple[VideoSource, ...] = ()
    row_id: str = ""


@dataclass
class ToolResult:
    """What a call gives back: text, and images (PIL) the model sees next (a crop, a video's frames)."""

    text: str = ""
    images: list[Image.Image] = field(default_factory=list)


@dataclass(frozen=True)
class ToolCall:
    """One call as the model wrote it: the tool's name, its arguments, and the raw text it came from."""

    name: str
    arguments: Mapping[str, Any]
    raw: str = ""


ToolFn = Callable[..., ToolResult]
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list,),
    "object": (dict,),
}


@dataclass(frozen=True)
class Tool:
    """A registered tool: its function, the description and JSON schema the model is shown, and the recipe's
    fixed keyword arguments (``tools.functions[].kwargs``: e.g. the coordinate system of ``crop_image``)."""

    name: str
    fn: ToolFn
    description: str
    parameters: Mapping[str, Any]  # JSON schema of an object: {"type": "object", "properties": ..., "required": ...}
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function schema chat templates render (``apply_chat_template(tools=[...])``)."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}}

    def with_kwargs(self, kwargs: Mapping[str, Any]) -> Tool:
        return Tool(self.name, self.fn, self.description, self.parameters, dict(kwargs))

    def check_arguments(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments, checked against the schema's properties (required, known names, JSON types, array
        lengths, enums); raises :class:`ToolArgumentError` naming the first problem."""
        return check_arguments(self.name, self.parameters, arguments)

    def __call__(self, media: ToolMedia, arguments: Mapping[str, Any]) -> ToolResult:
        result = self.fn(media, **self.check_arguments(arguments), **self.kwargs)
        if isinstance(result, str):
            result = ToolResult(text=result)
        if not isinstance(result, ToolResult):
            raise TypeError(f"tool '{self.name}' returned {type(result).__name__}, not a ToolResult or str")
        bad = [type(im).__name__ for im in result.images if not isinstance(im, Image.Image)]
        if bad:
            raise TypeError(f"tool '{self.name}' returned images of type {', '.join(bad)}; images must be PIL images")
        return result


def _json_type_ok(value: Any, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False  # JSON's true is not a number
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        return True  # 3.0 written for 3
    return isinstance(value, JSON_TYPES.get(kind, (object,)))


def check_arguments(tool: str, schema: Mapping[str, Any], arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of JSON schema tool parameters use, checked without a schema library: an object's
    ``required`` names, no unknown names, each property's ``type``, ``enum``, ``minItems``/``maxItems`` and
    the ``type`` of an array's items; integers written as 3.0 become 3."""
    if not isinstance(arguments, Mapping):
        raise ToolArgumentError(f"{tool}: arguments must be a JSON object, got {type(arguments).__name__}")
    properties = dict(schema.get("properties", {}))
    missing = [name for name in schema.get("required", ()) if name not in arguments]
    if missing:
        raise ToolArgumentError(f"{tool}: missing required argument(s) {', '.join(missing)}")
    unknown = sorted(set(arguments) - set(properties))
    if unknown:
        raise ToolArgumentError(f"{tool}: unknown argument(s) {', '.join(unknown)}; it takes "
                                f"{', '.join(properties) or 'none'}")
    out: dict[str, Any] = {}
    for name, value in arguments.items():
        spec = properties[name]
        kind = spec.get("type")
        if kind and not _json_type_ok(value, kind):
            raise ToolArgumentError(f"{tool}: argument {name} must be a JSON {kind}, got {json_kind(value)}")
        if kind == "integer" and isinstance(value, float):
            value = int(value)
        if "enum" in spec and value not in spec["enum"]:
            raise ToolArgumentError(f"{tool}: argument {name} must be one of {list(spec['enum'])}, got {value!r}")
        if kind == "array":
            lo, hi = spec.get("minItems", 0), spec.get("maxItems")
            if len(value) < lo or (hi is not None and len(value) > hi):
                size = f"{lo}" if lo == hi else f"{lo} to {hi if hi is not None else 'any'}"
                raise ToolArgumentError(f"{tool}: argument {name} must have {size} items, got {len(value)}")
            item = spec.get("items", {}).get("type")
            if item and not all(_json_type_ok(v, item) for v in value):
                raise ToolArgumentError(f"{tool}: argument {name} must hold JSON {item}s, got {value!r}")
        out[name] = value
    return out


def json_kind(value: Any) -> str:
    """The JSON name of a Python value's type (for messages the model reads)."""
    for name, types in (("boolean", (bool,)), ("integer", (int,)), ("number", (float,)), ("string", (str,)),
                        ("array", (list, tuple)), ("object", (dict,))):
        if isinstance(value, types):
            return name
    return "null" if value is None else type(value).__name__
