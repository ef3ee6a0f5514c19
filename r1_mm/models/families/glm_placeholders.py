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

from r1_mm.models.class_swap import swap_class

TYPES_ATTRIBUTE = "_r1mm_mm_token_types"
TYPED_MARKER = "r1mm_typed_placeholders"  # on the swapped class: the model's own class


def _typed_methods(base: type) -> dict[str, Any]:
    """``base``'s forward and placeholder masks, the masks following the token types of the forward being run
    (a swapped class, not wrapped methods: see models/class_swap)."""

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        setattr(self, TYPES_ATTRIBUTE, kwargs.get("mm_token_type_ids"))
        try:
            return base.forward(self, *args, **kwargs)
        finally:
            setattr(self, TYPES_ATTRIBUTE, None)

    def get_placeholder_mask(self: Any, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor,
                             image_features: torch.Tensor | None = None,
                             video_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        kinds = getattr(self, TYPES_ATTRIBUTE, None)
        if input_ids is None or kinds is None or kinds.shape != input_ids.shape:
            return base.get_placeholder_mask(self, input_ids, inputs_embeds, image_features=image_features,
                                             video_features=video_features)
        placeholder = input_ids == self.config.image_token_id
        masks = {"image": placeholder & (kinds == 1), "video": placeholder & (kinds == 2)}
        for kind, features in (("image", image_features), ("video", video_features)):
            found = int(masks[kind].sum())
            if features is not None and found * inputs_embeds.shape[-1] != features.numel():
                raise ValueError(f"{kind} features and {kind} tokens do not match: {found} tokens, "
                                 f"{features.numel() // inputs_embeds.shape[-1]} features")
        device = inputs_embeds.device
        return masks["image"].unsqueeze(-1).to(device), masks["video"].unsqueeze(-1).to(device)

    return {"forward": forward, "get_placeholder_mask": get_placeholder_mask}


def install(model: torch.nn.Module) -> None:
    """Swap the inner model's class for the typed one (idempotent). ``model``: the ForConditionalGeneration or
    its inner model."""
    core = getattr(model, "model", model)
    if getattr(core, "get_placeholder_mask", None) is not None:
        swap_class(core, TYPED_MARKER, _typed_methods)
