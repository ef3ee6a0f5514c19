"""``crop_image``: cut a region out of one of the row's images at its original resolution (DeepEyes'
zoom-in tool). The model names the region in the coordinates it was trained to write; the recipe says which
(``tools.functions: [{name: crop_image, kwargs: {coordinates: ...}}]``):

- ``shown`` (default): pixels of the image as the model saw it, after the recipe's pixel budget (Qwen2-VL and
  Qwen2.5-VL ground in these absolute coordinates);
- ``original``: pixels of the file;
- ``normalized``: fractions in [0, 1];
- ``thousandths``: 0-1000 (Qwen3-VL grounds in these relative coordinates).
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from r1_mm.tools.base import ToolArgumentError, ToolMedia, ToolResult
from r1_mm.tools.registry import tool

COORDINATES = ("shown", "original", "normalized", "thousandths")

PARAMETERS = {
    "properties": {
        "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                    "description": "the region to zoom into, [x1, y1, x2, y2]: top-left and bottom-right corners"},
        "image_index": {"type": "integer", "description": "which image of the question (0 = the first); default 0"},
        "label": {"type": "string", "description": "optional: what the region shows"},
    },
    "required": ["bbox_2d"],
}


def to_original_box(box: list[float], image: Image.Image, shown: tuple[int, int], coordinates: str) -> list[float]:
    """The box in the original image's pixels."""
    width, height = image.size
    if coordinates == "original":
        sx, sy = 1.0, 1.0
    elif coordinates == "shown":
        sx, sy = width / shown[0], height / shown[1]
    elif coordinates == "normalized":
        sx, sy = float(width), float(height)
    elif coordinates == "thousandths":
        sx, sy = width / 1000.0, height / 1000.0
    else:
        raise ValueError(f"crop_image: coordinates must be one of {', '.join(COORDINATES)}, got {coordinates!r}")
    x1, y1, x2, y2 = box
    return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]


def grow_to(lo: float, hi: float, side: float, limit: int) -> tuple[int, int]:
    """[lo, hi] widened around its centre to at least ``side`` pixels, kept inside [0, limit]."""
    if hi - lo < side:
        centre = (lo + hi) / 2
        lo, hi = centre - side / 2, centre + side / 2
    shift = max(0.0, -lo) - max(0.0, hi - limit)
    lo, hi = max(0.0, lo + shift), min(float(limit), hi + shift)
    return int(round(lo)), int(round(hi))


@tool("crop_image", description="Zoom into a region of an image: returns that region at full resolution.",
      parameters=PARAMETERS)
def crop_image(media: ToolMedia, bbox_2d: list[float], image_index: int = 0, label: str = "", *,
               coordinates: str = "shown", min_side: int = 28, zoom: float = 1.0, **_: Any) -> ToolResult:
    """``min_side``: a smaller region is widened around its centre (the vision encoder's patch grid needs a
    few patches); ``zoom``: the crop is scaled by this factor before the rollout's pixel budget applies."""
    if not media.images:
        raise ToolArgumentError("crop_image: this question has no image")
    if not 0 <= image_index < len(media.images):
        raise ToolArgumentError(f"crop_image: image_index must be 0..{len(media.images) - 1}, got {image_index}")
    x1, y1, x2, y2 = bbox_2d
    if not (x1 < x2 and y1 < y2):
        raise ToolArgumentError(f"crop_image: bbox_2d must be [x1, y1, x2, y2] with x1 < x2 and y1 < y2, "
                                f"got {list(bbox_2d)}")
    image = media.images[image_index]
    shown = media.shown_sizes[image_index] if image_index < len(media.shown_sizes) else image.size
    ox1, oy1, ox2, oy2 = to_original_box(list(bbox_2d), image, shown, coordinates)
    width, height = image.size
    if ox2 <= 0 or oy2 <= 0 or ox1 >= width or oy1 >= height:
        raise ToolArgumentError(f"crop_image: bbox_2d {list(bbox_2d)} lies outside image {image_index} "
                                f"({coordinates} coordinates: {_extent(shown, image.size, coordinates)})")
    left, right = grow_to(max(0.0, ox1), min(float(width), ox2), min_side, width)
    top, bottom = grow_to(max(0.0, oy1), min(float(height), oy2), min_side, height)
    region = image.convert("RGB").crop((left, top, right, bottom))
    if zoom != 1.0:
        region = region.resize((max(1, round(region.width * zoom)), max(1, round(region.height * zoom))),
                               Image.Resampling.BICUBIC)
    what = f" ({label})" if label else ""
    return ToolResult(text=f"Zoomed into {[round(v, 3) for v in bbox_2d]} of image {image_index}{what}.",
                      images=[region])


def _extent(shown: tuple[int, int], original: tuple[int, int], coordinates: str) -> str:
    if coordinates == "shown":
        return f"x 0..{shown[0]}, y 0..{shown[1]}"
    if coordinates == "original":
        return f"x 0..{original[0]}, y 0..{original[1]}"
    return "0..1" if coordinates == "normalized" else "0..1000"
