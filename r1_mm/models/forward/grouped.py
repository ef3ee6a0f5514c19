"""Score G completions of each multimodal prompt while running the vision tower and prompt once.

Why: in GRPO (and DPO) every prompt is scored with G (or 2) completions. The library way repeats
the full sequence G times, so a 1000-visual-token prompt is encoded G times. Here all prompts and
their completions form ONE padding-free row::

    [ p1 | c11 | c12 | ... | c1G | p2 | c21 | ... ]

Completion ``c_ij`` attends to ``p_i`` and its own earlier tokens only: the packed attention
(``packed_attention.py``) runs them as variable-length sequences with the prompt's keys gathered in
front, through flash-attention's varlen kernel, sdpa or eager, and never builds an L x L mask.
Position ids restart at "last prompt position + 1" for every completion (M-RoPE positions for the
prompt come from the model's own ``get_rope_index``), so each completion sees exactly what it would
see after its prompt alone. Only the positions that score a completion token go through the LM head.

``naive_logprobs`` is the library-equivalent path (G repeated sequences) used as the reference in
tests and benchmarks, and ``training.forward_mode=naive`` for models the packed path cannot serve.
Both score through ``token_scores`` (a tiled LM head): no (tokens x vocabulary) logits are built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from r1_mm.data.turns import ToolContext
from r1_mm.models.forward import packed_attention, packed_linear_attention, token_scores
from r1_mm.models.forward.packed_attention import PackedLayout
from r1_mm.models.forward.token_scores import ScoreRequest
from r1_mm.models.forward.truncated_scores import Truncation, kept_threshold
from r1_mm.models.weights import unwrap

# Per-prompt processor outputs that are concatenated across prompts (row-wise for patches).
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
               "image_sizes", "batch_num_images",  # these two: LLaVA-OneVision's anyres images
               "pixel_attention_mask")  # SmolVLM / Idefics3: the valid pixels of each padded tile
# token_type_ids: Gemma 3's image tokens (1), which attend to each other both ways; the naive forward passes
# them to the model, the grouped one turns them into bidirectional sequences of the packed layout
TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


class GroupedForwardError(ValueError):
    """Inputs the grouped forward cannot pack (the message says which and what to do)."""


def _core(model: torch.nn.Module) -> torch.nn.Module:
    inner = unwrap(model)
    return getattr(inner, "model", inner)


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
            # both forwards pass the processor's outputs through here, so naive mode is no way out
            raise GroupedForwardError(f"processor outputs {unknown} are not passed to the model by r1-mm's forward "
                                      "(grouped or naive): this model's family is not verified; run r1-mm check-model")
    merged: dict[str, torch.Tensor] = {}
    for key in VISION_KEYS:
        parts = [p[key] for p in prompts if key in p for _ in range(repeats)]
        if parts:
            parts = [torch.as_tensor(t) for t in parts]
            if (key, parts[0].dim()) in (("pixel_values", 5), ("pixel_attention_mask", 4)):
                parts = _pad_patches(parts)
            merged[key] = torch.cat(parts, dim=0)
    return merged


def _pad_patches(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """LLaVA-OneVision images are (images, patches, C, H, W) with a patch count per image size, SmolVLM's
    (prompts, tiles, C, H, W) with a tile count per prompt (and its pixel mask (prompts, tiles, H, W)): pad
    dim 1 with zeros to the largest count, as their processors do for a batch (the models drop the padding:
    LLaVA-OneVision by ``image_sizes``, SmolVLM the all-zero tiles)."""
    most = max(t.shape[1] for t in parts)
    padded = []
    for t in parts:
        out = t.new_zeros((t.shape[0], most, *t.shape[2:]))
        out[:, : t.shape[1]] = t
        padded.append(out)
    return padded


def bidirectional_blocks(token_types: torch.Tensor, offset: int) -> list[tuple[int, int]]:
    """(start, end) of each run of image tokens (type 1) in one prompt's ``token_type_ids``, shifted by
    ``offset``: the blocks transformers' Gemma 3 lets attend to each other both ways."""
    is_image = (token_types == 1).int()
    edges = torch.diff(torch.nn.functional.pad(is_image, (1, 1))).nonzero().flatten().tolist()
    return [(offset + a, offset + b) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def trajectory_positions(model: torch.nn.Module, prompt: dict[str, torch.Tensor], completion: list[int],
                         context: ToolContext) -> torch.Tensor:
    """Positions (axes, C) of a completion holding tool turns with images: the model's own position rule run on
    prompt + completion (M-RoPE gives each image mid-conversation its grid positions and moves the text after
    it on), of which the completion's part. Exactly what the processor's whole conversation would get."""
    n = prompt["input_ids"].shape[1]
    device = prompt["input_ids"].device
    joint = {"input_ids": torch.cat([prompt["input_ids"][0], torch.tensor(completion, dtype=torch.long, device=device)])[None]}
    if "mm_token_type_ids" in prompt and context.token_types is not None:
        types = torch.tensor(context.token_types, dtype=prompt["mm_token_type_ids"].dtype, device=device)
        joint["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"][0], types])[None]
    for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
        parts = [t.to(device) for t in (prompt.get(key), context.vision.get(key)) if t is not None]
        if parts:
            joint[key] = torch.cat(parts)
    return prompt_positions(model, joint)[:, n:]


def scored_mask(completions: list[list[int]], contexts: list[ToolContext | None], device: torch.device) -> torch.Tensor:
    """(rows, C) long: 1 on the tokens the learner scores: every token of a single-turn completion, only the
    model's own tokens of a trajectory with tool turns (tool turns are context, never scored)."""
    _, mask = pad_completions(completions, 0, device)
    for row, context in enumerate(contexts):
        if context is not None:
            if len(context.model_mask) != len(completions[row]):
                raise GroupedForwardError(f"completion {row}: {len(completions[row])} tokens but a model mask of "
                                          f"{len(context.model_mask)}")
            mask[row, : len(context.model_mask)] = torch.tensor(context.model_mask, dtype=torch.long, device=device)
    return mask


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
    """All prompts and their completions in ONE padding-free row, with the attention layout that keeps
    completions apart; ``logits_index[n]`` is the position whose logits score scored token n."""

    input_ids: torch.Tensor  # (1, T)
    layout: PackedLayout
    position_ids: torch.Tensor  # (3, 1, T) or (1, T)
    mm_token_type_ids: torch.Tensor | None  # (1, T)
    vision: dict[str, torch.Tensor]
    logits_index: torch.Tensor  # (N,) one per completion token, in (completion, token) order
    targets: torch.Tensor  # (N,) the completion tokens those logits score
    completion_ids: torch.Tensor  # (B*G, C) right-padded, for callers working per completion
    completion_mask: torch.Tensor  # (B*G, C): the scored tokens (a trajectory's tool turns are 0)
    num_generations: int

    def model_kwargs(self, model: torch.nn.Module) -> dict[str, Any]:
        kwargs = {"input_ids": self.input_ids, "attention_mask": packed_attention.layout_mask(self.layout, self.input_ids.device),
                  "position_ids": self.position_ids, **self.vision}
        if self.mm_token_type_ids is not None:
            kwargs["mm_token_type_ids"] = self.mm_token_type_ids
        return kwargs

    def to_completion_grid(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) per scored token -> (B*G, C), zero where a completion is shorter than C."""
        grid = values.new_zeros(self.completion_mask.shape)
        return grid.masked_scatter(self.completion_mask.bool(), values)


def pack_groups(model: torch.nn.Module, prompts: list[dict[str, torch.Tensor]], completions: list[list[int]],
                num_generations: int, pad_id: int, contexts: list[ToolContext | None] | None = None) -> PackedGroups:
    """Pack B prompts and B*G completions (grouped by prompt, in order) into one row.

    Layout ``[p1 | c11 .. c1G | p2 | c21 .. c2G | ..]`` with no padding; every completion's positions
    restart at "last position of its prompt + 1". The model's language attention is switched to the
    grouped implementation (once; calls without a layout behave as before).

    ``contexts``: per completion, the tool turns of a multi-turn trajectory (None: single-turn). A
    trajectory's tool images join the row's vision inputs after its prompt's (in the row's order, as the
    model scatters image features), its positions come from the model's rule on prompt + trajectory, and
    only its model-sampled tokens are scored.
    """
    g = num_generations
    if len(completions) != len(prompts) * g:
        raise GroupedForwardError(f"{len(completions)} completions for {len(prompts)} prompts x G={g}")
    packed_attention.enable(unwrap(model))
    packed_linear_attention.enable(unwrap(model))
    device = prompts[0]["input_ids"].device
    prompts = [_strip_padding(p) for p in prompts]
    contexts = list(contexts) if contexts is not None else [None] * len(completions)
    comp_ids, _ = pad_completions(completions, pad_id, device)
    comp_mask = scored_mask(completions, contexts, device)
    ids_parts, pos_parts, type_parts = [], [], []
    vision_parts: list[dict[str, torch.Tensor]] = []
    prompt_spans, completion_spans, logits_index = [], [], []
    blocks: list[list[tuple[int, int]]] = []
    cursor = 0
    for i, p in enumerate(prompts):
        n = p["input_ids"].shape[1]
        ids_parts.append(p["input_ids"][0])
        vision_parts.append(p)
        pos = prompt_positions(model, p)  # (axes, n)
        pos_parts.append(pos)
        if "mm_token_type_ids" in p:
            type_parts.append(p["mm_token_type_ids"][0])
        prompt_spans.append((cursor, cursor + n))
        blocks.append(bidirectional_blocks(p["token_type_ids"][0], cursor) if "token_type_ids" in p else [])
        last_prompt = cursor + n - 1
        cursor += n
        spans = []
        for j in range(g):
            c, context = completions[i * g + j], contexts[i * g + j]
            ids_parts.append(torch.tensor(c, dtype=torch.long, device=device))
            if context is not None and context.vision:
                pos_parts.append(trajectory_positions(model, p, c, context))
                vision_parts.append(context.vision)
            else:
                pos_parts.append(pos[:, -1:] + 1 + torch.arange(len(c), device=device)[None, :])
            if type_parts:
                types = context.token_types if context is not None and context.token_types is not None else [0] * len(c)
                type_parts.append(torch.tensor(types, dtype=type_parts[0].dtype, device=device))
            spans.append((cursor, cursor + len(c)))
            before = [last_prompt] + list(range(cursor, cursor + len(c) - 1)) if c else []
            scored = context.model_mask if context is not None else [1] * len(c)
            logits_index.extend(index for index, keep in zip(before, scored) if keep)
            cursor += len(c)
        completion_spans.append(spans)
    if type_parts and len(type_parts) != len(prompts) * (g + 1):
        raise GroupedForwardError("some prompts carry mm_token_type_ids and others do not")
    positions = torch.cat(pos_parts, dim=1)[:, None, :]  # (axes, 1, T)
    layout = packed_attention.build_layout(prompt_spans, completion_spans, cursor, device, bidirectional=blocks)
    targets = comp_ids[comp_mask.bool()]
    return PackedGroups(input_ids=torch.cat(ids_parts)[None], layout=layout,
                        position_ids=positions if positions.shape[0] == 3 else positions[0],
                        mm_token_type_ids=torch.cat(type_parts)[None] if type_parts else None,
                        vision=merge_vision_inputs(vision_parts),
                        logits_index=torch.tensor(logits_index, dtype=torch.long, device=device), targets=targets,
                        completion_ids=comp_ids, completion_mask=comp_mask, num_generations=g)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool,
                   suppressed_ids: list[int] | None = None,
                   truncation: Truncation | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full-logits reference: log p(target) under softmax(logits / temperature), and optionally the
    entropy, in float32. The learners score through ``token_scores`` instead (same values, no
    (tokens x vocabulary) tensors); tests compare the two.

    ``suppressed_ids`` are tokens the rollout engines never sample (media placeholders): the policy
    is the distribution without them, so the learner must normalise without them too. Otherwise
    their probability, never sampled and so never penalised, drifts up and every sampled token's
    logprob sinks by log(1 - p_suppressed).

    ``truncation``: renormalised over the sampler's top-k / top-p kept set plus the target (see
    ``truncated_scores``); logits are (N, vocabulary) then.
    """
    logits = logits.float() / temperature
    if suppressed_ids:
        logits[..., suppressed_ids] = float("-inf")
    if truncation is not None and truncation.active:
        target = logits.gather(-1, targets.unsqueeze(-1))
        cut = torch.minimum(kept_threshold(logits, truncation)[:, None], target)
        logits = logits.masked_fill(logits < cut, float("-inf"))
    logp_all = torch.log_softmax(logits, dim=-1)
    logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        finite = torch.nan_to_num(logp_all, neginf=0.0)
        entropy = -(logp_all.exp() * finite).sum(-1)
    return logps, entropy


def _request(positions: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool,
             suppressed_ids: list[int] | None, truncation: Truncation | None = None,
             with_full_logps: bool = False) -> ScoreRequest:
    return ScoreRequest(positions=positions, targets=targets, temperature=temperature,
                        suppressed_ids=tuple(suppressed_ids or ()), with_entropy=with_entropy,
                        truncation=truncation or Truncation(), with_full_logps=with_full_logps)


def _grids(out: token_scores.TokenScores, to_grid: Any, with_full_logps: bool) -> tuple:
    """(logps, entropy) per completion token, and the untruncated logps third when they were asked for."""
    grids = tuple(None if t is None else to_grid(t) for t in (out.logps, out.entropy, out.full_logps))
    return grids if with_full_logps else grids[:2]


def grouped_logprobs(model: torch.nn.Module, packed: PackedGroups, *, temperature: float = 1.0,
                     with_entropy: bool = False, suppressed_ids: list[int] | None = None,
                     truncation: Truncation | None = None, with_full_logps: bool = False) -> tuple:
    """Per-token logprobs (B*G, C) of the packed completions (zero where masked) and the entropy (or
    None); with ``with_full_logps`` also the untruncated logprobs (see ``truncated_scores``)."""
    out = token_scores.score(model, packed.model_kwargs(model),
                             _request(packed.logits_index, packed.targets, temperature, with_entropy, suppressed_ids,
                                      truncation, with_full_logps))
    return _grids(out, packed.to_completion_grid, with_full_logps)


@dataclass
class NaiveBatch:
    """The library way's inputs: B*G full sequences, and which of their positions score which tokens."""

    kwargs: dict[str, Any]
    positions: torch.Tensor  # (B*G, C) flat index of the position before each completion token
    completion_ids: torch.Tensor  # (B*G, C)
    completion_mask: torch.Tensor  # (B*G, C) the completions' tokens
    scored: torch.Tensor  # (B*G, C) the scored tokens (a trajectory's tool turns are 0)


def naive_batch(prompts: list[dict[str, torch.Tensor]], completions: list[list[int]], num_generations: int,
                pad_id: int, contexts: list[ToolContext | None] | None = None) -> NaiveBatch:
    """B*G full sequences (left-padded prompt + right-padded completion), media repeated; a trajectory's tool
    images follow its prompt's, and the model places them itself."""
    g = num_generations
    device = prompts[0]["input_ids"].device
    prompts = [_strip_padding(p) for p in prompts]
    contexts = list(contexts) if contexts is not None else [None] * len(completions)
    comp_ids, comp_mask = pad_completions(completions, pad_id, device)
    scored = scored_mask(completions, contexts, device)
    c = comp_ids.shape[1]
    p_max = max(p["input_ids"].shape[1] for p in prompts)
    rows = len(completions)
    input_ids = torch.full((rows, p_max + c), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((rows, p_max + c), dtype=torch.long, device=device)
    has_types = "mm_token_type_ids" in prompts[0]
    mm_types = torch.zeros((rows, p_max + c), dtype=torch.long, device=device) if has_types else None
    has_token_types = "token_type_ids" in prompts[0]
    token_types = torch.zeros((rows, p_max + c), dtype=torch.long, device=device)
    vision_parts: list[dict[str, torch.Tensor]] = []
    for i, p in enumerate(prompts):
        n = p["input_ids"].shape[1]
        for j in range(g):
            row = i * g + j
            context = contexts[row]
            vision_parts.append(p)
            input_ids[row, p_max - n:p_max] = p["input_ids"][0]
            attention[row, p_max - n:p_max] = 1
            if has_types:
                mm_types[row, p_max - n:p_max] = p["mm_token_type_ids"][0]
            if context is not None:
                vision_parts.append(context.vision)
                if has_types and context.token_types is not None:
                    types = torch.tensor(context.token_types, dtype=torch.long, device=device)
                    mm_types[row, p_max:p_max + len(types)] = types
            if has_token_types:
                token_types[row, p_max - n:p_max] = p["token_type_ids"][0]
    input_ids[:, p_max:] = comp_ids
    attention[:, p_max:] = comp_mask
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention,
                              **merge_vision_inputs(vision_parts)}
    if has_types:
        kwargs["mm_token_type_ids"] = mm_types
    if has_token_types:
        kwargs["token_type_ids"] = token_types
    width = p_max + c
    positions = (torch.arange(rows, device=device)[:, None] * width + p_max - 1
                 + torch.arange(c, device=device)[None, :])  # the position before each completion token
    return NaiveBatch(kwargs, positions, comp_ids, comp_mask, scored)


def naive_logprobs(model: torch.nn.Module, prompts: list[dict[str, torch.Tensor]], completions: list[list[int]],
                   num_generations: int, pad_id: int, *, temperature: float = 1.0, with_entropy: bool = False,
                   suppressed_ids: list[int] | None = None, truncation: Truncation | None = None,
                   with_full_logps: bool = False, contexts: list[ToolContext | None] | None = None) -> tuple:
    """The library way (:func:`naive_batch`). Returns what ``grouped_logprobs`` returns."""
    batch = naive_batch(prompts, completions, num_generations, pad_id, contexts)
    kwargs, positions, comp_ids, comp_mask, scored = (batch.kwargs, batch.positions, batch.completion_ids,
                                                      batch.completion_mask, batch.scored)
    rows, c = comp_ids.shape
    if contexts is None or all(context is None for context in contexts):  # every token scored (padding zeroed after)
        out = token_scores.score(model, kwargs, _request(positions.reshape(-1), comp_ids.reshape(-1), temperature,
                                                         with_entropy, suppressed_ids, truncation, with_full_logps))
        mask = comp_mask.to(out.logps.dtype)
        return _grids(out, lambda t: t.reshape(rows, c) * mask, with_full_logps)
    keep = scored.bool()
    out = token_scores.score(model, kwargs, _request(positions[keep], comp_ids[keep], temperature, with_entropy,
                                                     suppressed_ids, truncation, with_full_logps))
    return _grids(out, lambda t: t.new_zeros((rows, c)).masked_scatter(keep, t), with_full_logps)
