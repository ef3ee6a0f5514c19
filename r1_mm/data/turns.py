"""Tool turns as tokens: what the chat template writes between the end of a model turn and the next
generation prompt, and the processor's inputs for it (the vision tokens of the tool's images).

Why a delta of two renderings and not a template of our own: each family's chat template decides how a tool
result reads (Qwen: a user turn with ``<tool_response>``), and a trajectory must be tokenised exactly as the
processor would tokenise the whole conversation, or the learner trains on a context the model will never see.
Rendering a fixed conversation with and without the tool messages gives the template's own text for them;
what the template writes after an assistant turn's end token (Qwen: a newline) is prepended, because the model's
turn ends with that token and the rest is the template's.

Why the model's turns are never re-rendered: the learner trains on the sampler's own token ids (decoding and
re-encoding a completion can give other ids), so only the tool turns are tokenised here, and each is appended
to the ids as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from r1_mm.config.visual_budget import fit_to_budget
from r1_mm.data.loading import DataError
from r1_mm.data.prompts import encode_prompts, visual_factor

MODEL_TURN = "\u2063r1mm-model-turn\u2063"  # a string no template or tokenizer writes by itself


class TurnTemplateError(DataError):
    """A chat template that cannot continue a conversation with tool messages the way r1-mm appends them."""


def tool_message(text: str, images: int) -> dict[str, Any]:
    """One tool result as a chat message: its text, then its images."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    return {"role": "tool", "content": parts + [{"type": "image"} for _ in range(images)]}


def continuation_text(processor: Any, tool_messages: Sequence[dict[str, Any]], end_of_turn: str) -> str:
    """The text that follows a model turn ending in ``end_of_turn`` (its last sampled token, as text): the
    template's glue after that token, the tool messages, and the next generation prompt."""
    head = [{"role": "user", "content": [{"type": "text", "text": "question"}]},
            {"role": "assistant", "content": [{"type": "text", "text": MODEL_TURN}]}]
    base = processor.apply_chat_template(head, tokenize=False, add_generation_prompt=False)
    full = processor.apply_chat_template(head + list(tool_messages), tokenize=False, add_generation_prompt=True)
    if not full.startswith(base):
        raise TurnTemplateError("the chat template renders earlier turns differently once tool messages follow, so a "
                                "trajectory cannot be extended turn by turn")
    after = base[base.index(MODEL_TURN) + len(MODEL_TURN):]
    if not after.startswith(end_of_turn):
        raise TurnTemplateError(f"the chat template ends an assistant turn with {after[:20]!r}, not with the model's "
                                f"end-of-turn token {end_of_turn!r}")
    return after[len(end_of_turn):] + full[len(base):]


def budget_image(image: Image.Image, processor: Any, *, min_pixels: int, max_pixels: int) -> Image.Image:
    """A tool's image resized into the recipe's budget on the processor's patch grid, as prompt images are
    (the processor is then told not to resize again)."""
    factor = visual_factor(processor)
    height, width = fit_to_budget(image.height, image.width, factor=factor, min_pixels=min_pixels,
                                  max_pixels=max_pixels)
    image = image.convert("RGB")
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.BICUBIC)


def encode_turn(processor: Any, text: str, images: Sequence[Image.Image]) -> Any:
    """The processor's inputs for one tool turn (ids with the images' vision tokens, pixels, grids); the
    images must already be budgeted (:func:`budget_image`)."""
    return encode_prompts(processor, [text], list(images), [])


def unexpanded_turn_ids(processor: Any, text: str) -> list[int]:
    """A tool turn's ids as its text tokenises, each image one placeholder as the chat template writes it (what
    vLLM's processor expands from the images it is given, as it does for a text prompt)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# keys of a tool turn's processor output that are per token (the rest are its images' vision tensors)
TURN_TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class ToolContext:
    """What the learner needs of a trajectory beyond its token ids: which tokens the model sampled (the
    loss and the scores cover only those; tool turns are context), the tool turns' per-token media types
    (``mm_token_type_ids``: M-RoPE positions of images mid-conversation), and the tool images' vision
    tensors in order of appearance (``pixel_values``, ``image_grid_thw``, ...)."""

    model_mask: list[int]  # one per completion token: 1 = sampled by the model, 0 = a tool turn's
    token_types: list[int] | None = None  # mm_token_type_ids of the completion tokens (None: the family has none)
    vision: dict[str, torch.Tensor] = field(default_factory=dict)
    # for an engine that expands media placeholders itself (vLLM): the tool images as budgeted (PIL, in order of
    # appearance) and the completion's ids with each tool turn as its text tokenises, before the processor expanded
    # its images' placeholders (the model turns as sampled); None where a tool turn was added without them
    images: list[Image.Image] = field(default_factory=list)
    unexpanded_ids: list[int] | None = None

    @property
    def num_images(self) -> int:
        grid = self.vision.get("image_grid_thw")
        return 0 if grid is None else int(grid.shape[0])


class TrajectoryBuilder:
    """A multi-turn completion assembled turn by turn: the model's sampled tokens as they are, each tool turn
    as :func:`encode_turn` tokenised it."""

    def __init__(self, with_token_types: bool):
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.model_mask: list[int] = []
        self.token_types: list[int] | None = [] if with_token_types else None
        self.vision_parts: list[dict[str, torch.Tensor]] = []
        self.images: list[Image.Image] = []
        self.unexpanded_ids: list[int] | None = []

    def add_model_turn(self, ids: Sequence[int], logprobs: Sequence[float] | None = None) -> None:
        self.ids += list(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)
        self.model_mask += [1] * len(ids)
        if self.token_types is not None:
            self.token_types += [0] * len(ids)
        if self.unexpanded_ids is not None:
            self.unexpanded_ids += list(ids)

    def add_tool_turn(self, inputs: Any, images: Sequence[Image.Image] | None = None,
                      unexpanded_ids: Sequence[int] | None = None) -> None:
        """``inputs``: the turn's processor output (:func:`encode_turn`); ``images`` (what it was given) and
        ``unexpanded_ids`` (:func:`unexpanded_turn_ids`) for engines that expand placeholders themselves."""
        ids = inputs["input_ids"][0].tolist()
        self.ids += ids
        self.logprobs += [0.0] * len(ids)
        self.model_mask += [0] * len(ids)
        if self.token_types is not None:
            types = inputs.get("mm_token_type_ids")
            self.token_types += types[0].tolist() if types is not None else [0] * len(ids)
        vision = {k: v for k, v in inputs.items() if k not in TURN_TEXT_KEYS}
        if vision:
            self.vision_parts.append(vision)
        self.images += list(images or [])
        if unexpanded_ids is None or (vision and not images):
            self.unexpanded_ids = None  # this trajectory can be continued only by an engine that takes expanded ids
        elif self.unexpanded_ids is not None:
            self.unexpanded_ids += list(unexpanded_ids)

    @property
    def num_tool_tokens(self) -> int:
        return len(self.model_mask) - sum(self.model_mask)

    def context(self) -> ToolContext:
        vision: dict[str, torch.Tensor] = {}
        for key in {k for part in self.vision_parts for k in part}:
            vision[key] = torch.cat([torch.as_tensor(part[key]) for part in self.vision_parts if key in part])
        return ToolContext(model_mask=list(self.model_mask),
                           token_types=None if self.token_types is None else list(self.token_types), vision=vision,
                           images=list(self.images),
                           unexpanded_ids=None if self.unexpanded_ids is None else list(self.unexpanded_ids))
