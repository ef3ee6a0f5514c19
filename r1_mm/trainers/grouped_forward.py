"""Score G completions of each multimodal prompt while running the vision tower and prompt once.

Why: in GRPO (and DPO) every prompt is scored with G (or 2) completions. The library way repeats
the full sequence G times, so a 1000-visual-token prompt is encoded G times. Here each prompt and
its completions form ONE packed row::

    [ pad ... pad | prompt | c1 (right-padded to C) | c2 | ... | cG ]

with a 4-D mask in which completion j sees the prompt and its own earlier tokens only, and position
ids in which every completion restarts at "last prompt position + 1" (M-RoPE positions for the
prompt come from the model's own ``get_rope_index``). Left-padding the prompt and padding every
completion to the batch's longest makes the scored positions identical in all rows, so the model's
``logits_to_keep`` index tensor computes logits only where they are needed.

This route works with gradient checkpointing (the KV-cache route does not) and uses less memory;
its 4-D mask needs ``sdpa`` or ``eager`` attention (not flash-attention). ``naive_logprobs`` is
the library-equivalent path (G repeated sequences) used as the reference in tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Per-prompt processor outputs that are concatenated across prompts (row-wise for patches).
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
               "image_sizes", "batch_num_images")  # the last two: LLaVA-OneVision's anyres images
TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


class GroupedForwardError(ValueError):
    """Inputs the grouped forward cannot pack (the message says which and what to do)."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / DeepSpeed / peft wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def _core(model: torch.nn.Module) -> torch.nn.Module:
    inner = unwrap(model)
    return getattr(inner, "model", inner)


def attn_implementation(model: torch.nn.Module) -> str:
    config = unwrap(model).config
    text = getattr(config, "text_config", config)
    return getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", "sdpa") or "sdpa"


def prompt_positions(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Position ids of one unpadded prompt: (3, P) for M-RoPE models, (1, P) otherwise."""
    ids = inputs["input_ids"]
    core = _core(model)
    if hasattr(core, "get_rope_index") and "mm_token_type_ids" in inputs:
        kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
        if "second_per_grid_ts" in kwargs and "second_per_grid_ts" not in core.get_rope_index.__code__.co_varnames:
            kwargs.pop("second_per_grid_ts")
        positions, _ = core.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                           attention_mask=torch.ones_like(ids), **kwargs)
        return positions[:, 0, :]
    return torch.arange(ids.shape[1], device=ids.device)[None, :]


def _strip_padding(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A single prompt's text tensors without padding (the processor may have padded it)."""
    keep = inputs["attention_mask"][0].bool()
    out = dict(inputs)
    for key in TEXT_KEYS:
        if key in inputs:
            out[key] = inputs[key][:, keep]
    return out


def merge_vision_inputs(prompts: list[dict[str, torch.Tensor]], repeats: int = 1) -> dict[str, torch.Tensor]:
    """Concatenate the prompts' vision tensors in order (each prompt's repeated ``repeats`` times)."""
    for p in prompts:
        unknown = [k for k in p if k not in VISION_KEYS + TEXT_KEYS]
        if unknown:
            raise GroupedForwardError(f"processor outputs {unknown} are not supported by the grouped forward; "
                                      "set training.forward_mode=naive")
    merged: dict[str, torch.Tensor] = {}
    for key in VISION_KEYS:
        parts = [p[key] for p in prompts if key in p for _ in range(repeats)]
        if parts:
            parts = [torch.as_tensor(t) for t in parts]
            if key == "pixel_values" and parts[0].dim() == 5:
                parts = _pad_patches(parts)
            merged[key] = torch.cat(parts, dim=0)
    return merged


def _pad_patches(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """LLaVA-OneVision images are (images, patches, C, H, W) with a patch count per image size: pad
    with zeros to the largest count, as its processor does for a batch (the model drops the padding
    using ``image_sizes``)."""
    most = max(t.shape[1] for t in parts)
    return [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, most - t.shape[1])) for t in parts]


def pad_completions(completions: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(1, max(len(c) for c in completions))
    ids = torch.full((len(completions), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(completions), length), dtype=torch.long, device=device)
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long, device=device)
        mask[i, : len(c)] = 1
    return ids, mask


@dataclass
class PackedGroups:
    """B packed rows, each a prompt and its G completions; scored positions are shared by all rows."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, 1, L, L): bool (True = attend) or additive float
    position_ids: torch.Tensor  # (3, B, L) or (B, L)
    mm_token_type_ids: torch.Tensor | None  # (B, L)
    vision: dict[str, torch.Tensor]
    logits_index: torch.Tensor  # (G*C,) positions whose logits score the completion tokens
    completion_ids: torch.Tensor  # (B*G, C)
    completion_mask: torch.Tensor  # (B*G, C)
    num_generations: int

    def model_kwargs(self) -> dict[str, Any]:
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                  "position_ids": self.position_ids, **self.vision}
        if self.mm_token_type_ids is not None:
            kwargs["mm_token_type_ids"] = self.mm_token_type_ids
        return kwargs


def pack_groups(model: torch.nn.Module, prompts: list[dict[str, torch.Tensor]], completions: list[list[int]],
                num_generations: int, pad_id: int) -> PackedGroups:
    """Build packed rows for B prompts and B*G completions (completions grouped by prompt, in order)."""
    g = num_generations
    if len(completions) != len(prompts) * g:
        raise GroupedForwardError(f"{len(completions)} completions for {len(prompts)} prompts x G={g}")
    device = prompts[0]["input_ids"].device
    prompts = [_strip_padding(p) for p in prompts]
    comp_ids, comp_mask = pad_completions(completions, pad_id, device)
    c = comp_ids.shape[1]
    p_max = max(p["input_ids"].shape[1] for p in prompts)
    b, length = len(prompts), p_max + g * c
    input_ids = torch.full((b, length), pad_id, dtype=torch.long, device=device)
    segment = torch.full((b, length), -1, dtype=torch.long, device=device)  # -1 = padding, 0 = prompt, j = c_j
    positions = None
    mm_types = None
    for i, p in enumerate(prompts):
        n = p["input_ids"].shape[1]
        start = p_max - n
        input_ids[i, start:p_max] = p["input_ids"][0]
        segment[i, start:p_max] = 0
        pos = prompt_positions(model, p)  # (axes, n)
        if positions is None:
            positions = torch.zeros((pos.shape[0], b, length), dtype=torch.long, device=device)
        positions[:, i, start:p_max] = pos
        next_pos = pos[:, -1:] + 1
        if "mm_token_type_ids" in p:
            if mm_types is None:
                mm_types = torch.zeros((b, length), dtype=p["mm_token_type_ids"].dtype, device=device)
            mm_types[i, start:p_max] = p["mm_token_type_ids"][0]
        for j in range(g):
            row = i * g + j
            lo = p_max + j * c
            input_ids[i, lo:lo + c] = comp_ids[row]
            segment[i, lo:lo + c] = torch.where(comp_mask[row].bool(), j + 1, -1)
            positions[:, i, lo:lo + c] = next_pos + torch.arange(c, device=device)[None, :]
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    causal = torch.ones((length, length), dtype=torch.bool, device=device).tril()
    allowed = causal[None] & (k_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))
    allowed |= torch.eye(length, dtype=torch.bool, device=device)[None]  # padding rows see themselves (no NaN)
    mask = allowed[:, None]
    if attn_implementation(model) == "eager":
        dtype = next(unwrap(model).parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    elif attn_implementation(model) not in ("sdpa",):
        raise GroupedForwardError(f"attn_implementation={attn_implementation(model)!r} cannot take the packed 4-D "
                                  "mask; use sdpa or eager, or training.forward_mode=naive")
    index = [p_max - 1 if k == 0 else p_max + j * c + k - 1 for j in range(g) for k in range(c)]
    position_ids = positions if positions.shape[0] == 3 else positions[0]
    return PackedGroups(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                        mm_token_type_ids=mm_types, vision=merge_vision_inputs(prompts),
                        logits_index=torch.tensor(index, dtype=torch.long, device=device),
                        completion_ids=comp_ids, completion_mask=comp_mask, num_generations=g)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool,
                   suppressed_ids: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) under softmax(logits / temperature), and optionally the entropy, in float32.

    ``suppressed_ids`` are tokens the rollout engines never sample (media placeholders): the policy
    is the distribution without them, so the learner must normalise without them too. Otherwise
    their probability, never sampled and so never penalised, drifts up and every sampled token's
    logprob sinks by log(1 - p_suppressed).
    """
    logits = logits.float() / temperature
    if suppressed_ids:
        logits[..., suppressed_ids] = float("-inf")
    logp_all = torch.log_softmax(logits, dim=-1)
    logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        finite = torch.nan_to_num(logp_all, neginf=0.0)
        entropy = -(logp_all.exp() * finite).sum(-1)
    return logps, entropy


def grouped_logprobs(model: torch.nn.Module, packed: PackedGroups, *, temperature: float = 1.0,
                     with_entropy: bool = False,
                     suppressed_ids: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs (B*G, C) of the packed completions (zero where masked)."""
    out = model(**packed.model_kwargs(), logits_to_keep=packed.logits_index, use_cache=False)
    b, g = packed.input_ids.shape[0], packed.num_generations
    c = packed.completion_ids.shape[1]
    logits = out.logits.reshape(b * g, c, -1)
    logps, entropy = token_logprobs(logits, packed.completion_ids, temperature, with_entropy, suppressed_ids)
    mask = packed.completion_mask.to(logps.dtype)
    return logps * mask, (entropy * mask if entropy is not None else None)


def naive_logprobs(model: torch.nn.Module, prompts: list[dict[str, torch.Tensor]], completions: list[list[int]],
                   num_generations: int, pad_id: int, *, temperature: float = 1.0, with_entropy: bool = False,
                   suppressed_ids: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The library way: B*G full sequences (left-padded prompt + right-padded completion), media repeated."""
    g = num_generations
    device = prompts[0]["input_ids"].device
    prompts = [_strip_padding(p) for p in prompts]
    comp_ids, comp_mask = pad_completions(completions, pad_id, device)
    c = comp_ids.shape[1]
    p_max = max(p["input_ids"].shape[1] for p in prompts)
    rows = len(completions)
    input_ids = torch.full((rows, p_max + c), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((rows, p_max + c), dtype=torch.long, device=device)
    has_types = "mm_token_type_ids" in prompts[0]
    mm_types = torch.zeros((rows, p_max + c), dtype=torch.long, device=device) if has_types else None
    for i, p in enumerate(prompts):
        n = p["input_ids"].shape[1]
        for j in range(g):
            row = i * g + j
            input_ids[row, p_max - n:p_max] = p["input_ids"][0]
            attention[row, p_max - n:p_max] = 1
            if has_types:
                mm_types[row, p_max - n:p_max] = p["mm_token_type_ids"][0]
    input_ids[:, p_max:] = comp_ids
    attention[:, p_max:] = comp_mask
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention,
                              **merge_vision_inputs(prompts, repeats=g)}
    if has_types:
        kwargs["mm_token_type_ids"] = mm_types
    out = model(**kwargs, logits_to_keep=c + 1, use_cache=False)
    logps, entropy = token_logprobs(out.logits[:, :-1], comp_ids, temperature, with_entropy, suppressed_ids)
    mask = comp_mask.to(logps.dtype)
    return logps * mask, (entropy * mask if entropy is not None else None)
