"""M-RoPE positions of text after a video, as the Qwen2-VL family was trained and as vLLM computes them.

Why a patch: in the pinned transformers (5.19) ``get_rope_index`` of Qwen2-VL, Qwen2.5-VL (and GLM-4.1V,
which shares the code) starts the text after a vision span at ``start + max(h, w) / merge``, leaving out
the span's temporal extent. The released models' own code, and vLLM, start it one past the largest
position of anything before it. For an image (one temporal step) both agree; after a video the text
then reuses the video's temporal positions in transformers only. The learner would score its tokens at
other positions than vLLM sampled them at (1e-3 nats per token on a tiny random model, growing with
the weights) and than the model was trained with. r1-mm therefore wraps each model's
``get_rope_index`` so every span (text or vision) starts one past the largest position before it; the
grouped forward, the naive forward and ``generate`` (the hf engine) all read positions through it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

PATCHED = "_r1mm_positions_continue_past_vision"


def continue_past_vision(positions: torch.Tensor, types: torch.Tensor,
                         attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``positions`` (3, B, L) with each span of equal ``types`` (text 0, image 1, video 2) moved so it
    starts one past the largest position of the spans before it; and the rope deltas (B, 1)."""
    fixed = positions.clone()
    deltas = []
    for b in range(positions.shape[1]):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones_like(types[b], dtype=torch.bool)
        row, kinds = fixed[:, b, keep], types[b, keep]
        starts = [0, *(torch.nonzero(kinds[1:] != kinds[:-1]).flatten() + 1).tolist(), int(kinds.numel())]
        for first, end in zip(starts[1:-1], starts[2:]):
            row[:, first:end] += int(row[:, :first].max()) + 1 - int(row[:, first:end].min())
        fixed[:, b, keep] = row
        deltas.append(int(row.max()) + 1 - int(keep.sum()) if row.numel() else 0)
    return fixed, torch.tensor(deltas, device=positions.device).unsqueeze(1)


def install(model: torch.nn.Module) -> None:
    """Wrap the model's ``get_rope_index`` (idempotent). ``model``: the ForConditionalGeneration or its
    inner model; nothing happens for a model without M-RoPE."""
    core = getattr(model, "model", model)
    original = getattr(core, "get_rope_index", None)
    if original is None or getattr(original, PATCHED, False):
        return
    core.get_rope_index = _wrapped(original)


def _wrapped(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    def get_rope_index(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        positions, deltas = original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs).arguments
        types = bound.get("mm_token_type_ids")
        if types is None:
            return positions, deltas
        return continue_past_vision(positions, types, bound.get("attention_mask"))

    setattr(get_rope_index, PATCHED, True)
    return get_rope_index
