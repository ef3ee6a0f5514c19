"""Image and video placeholders of GLM-4.1V / GLM-4.5V told apart by the processor's token types.

Why a patch: GLM writes a video frame's features on ``<|image|>`` tokens, and the pinned transformers'
``get_placeholder_mask`` takes every ``<|image|>`` token as both an image and a video placeholder. A forward
whose rows hold images and a video together (the learner scoring a step that mixes image and video prompts)
then fails: "Image features and image tokens do not match, tokens: 152, features: 24" on the tiny model.
The processor's ``mm_token_type_ids`` (image 1, video 2) say which is which, and the grouped forward packs
them beside the ids; the inner model's forward keeps them for its ``get_placeholder_mask``. (The video span
tokens around them cannot: a sampled completion may hold a stray ``<|begin_of_video|>``.) Without types, or
with ids of another shape, transformers' own masks are used.
"""

from __future__ import annotations

from typing import Any

import torch

PATCHED = "_r1mm_typed_placeholders"


def install(model: torch.nn.Module) -> None:
    """Wrap the inner model's ``forward`` and ``get_placeholder_mask`` (idempotent). ``model``: the
    ForConditionalGeneration or its inner model."""
    core = getattr(model, "model", model)
    original_mask = getattr(core, "get_placeholder_mask", None)
    if original_mask is None or getattr(original_mask, PATCHED, False):
        return
    config = core.config
    types: dict[str, torch.Tensor | None] = {"current": None}
    original_forward = core.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        types["current"] = kwargs.get("mm_token_type_ids")
        try:
            return original_forward(*args, **kwargs)
        finally:
            types["current"] = None

    def get_placeholder_mask(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor,
                             image_features: torch.Tensor | None = None,
                             video_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        kinds = types["current"]
        if input_ids is None or kinds is None or kinds.shape != input_ids.shape:
            return original_mask(input_ids, inputs_embeds, image_features=image_features, video_features=video_features)
        placeholder = input_ids == config.image_token_id
        masks = {"image": placeholder & (kinds == 1), "video": placeholder & (kinds == 2)}
        for kind, features in (("image", image_features), ("video", video_features)):
            found = int(masks[kind].sum())
            if features is not None and found * inputs_embeds.shape[-1] != features.numel():
                raise ValueError(f"{kind} features and {kind} tokens do not match: {found} tokens, "
                                 f"{features.numel() // inputs_embeds.shape[-1]} features")
        device = inputs_embeds.device
        return masks["image"].unsqueeze(-1).to(device), masks["video"].unsqueeze(-1).to(device)

    setattr(get_placeholder_mask, PATCHED, True)
    core.forward = forward
    core.get_placeholder_mask = get_placeholder_mask
