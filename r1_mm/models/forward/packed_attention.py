"""Attention for the grouped forward: every completion sees its prompt and itself, with no L x L mask.

Why a registered attention function: the grouped forward packs each prompt and its G completions
into one padding-free row ``[p1 | c11 .. c1G | p2 | c21 ..]``. Completion ``c_ij`` must attend to
prompt ``p_i`` and to its own earlier tokens only. A dense 4-D mask says that, but costs
O(L^2) memory per row (16k-token video prompts with G=8 completions would need >0.5 GB of mask per
layer call) and rules out flash-attention. Instead, this function turns the row into *variable-length
sequences*: the prompt (causal), and per completion the prompt's keys followed by its own (causal,
aligned bottom-right, as flash-attention's varlen kernel aligns a query shorter than its keys). The
keys are gathered by index once per layer and one varlen kernel call does the rest:

- ``flash_attention_2`` / ``_3``: transformers' own flash-attention integration (``flash_attn_varlen_func``);
- ``sdpa``: ``scaled_dot_product_attention`` per sequence (CPU, or GPUs without flash-attn);
- ``eager``: the same in plain matmul + softmax.

The layout travels on the row's 2-D attention mask (:func:`layout_mask`); the mask function registered
with the grouped attention hands it to every decoder layer, so it survives gradient checkpointing's
recompute. Any call without a layout (generation, the naive forward, the vision
tower) goes to the model's original attention implementation unchanged.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

PREFIX = "r1mm_grouped_"
# attention implementations a recipe may request, and whether the grouped forward has a kernel for them
SUPPORTED_BASES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
# calls per kernel since import: lets tests assert that the packed path (and which kernel) really ran
KERNEL_CALLS: Counter[str] = Counter()


class PackedAttentionError(ValueError):
    """A model or attention implementation the grouped forward cannot serve (the message says what to do)."""


@dataclass
class PackedLayout:
    """Variable-length attention sequences inside one packed row, as flat token indices.

    Sequence s has queries ``q_index[cu_q[s]:cu_q[s+1]]`` and keys ``k_index[cu_k[s]:cu_k[s+1]]``;
    queries are the last positions of their keys (bottom-right causal alignment).
    """

    q_index: torch.Tensor  # (Tq,) long
    k_index: torch.Tensor  # (Tk,) long
    cu_q: torch.Tensor  # (S+1,) int32
    cu_k: torch.Tensor  # (S+1,) int32
    max_q: int
    max_k: int
    length: int  # tokens in the packed row
    # per sequence: False where its queries (one image's tokens) see all its keys (bidirectional), None = all causal
    causal: tuple[bool, ...] | None = None

    @property
    def num_sequences(self) -> int:
        return self.cu_q.numel() - 1

    def spans(self) -> list[tuple[int, int, int, int]]:
        """(q_start, q_end, k_start, k_end) per sequence, in the gathered tensors."""
        q, k = self.cu_q.tolist(), self.cu_k.tolist()
        return [(q[s], q[s + 1], k[s], k[s + 1]) for s in range(self.num_sequences)]

    def is_causal(self, sequence: int) -> bool:
        return self.causal is None or self.causal[sequence]


def _prompt_runs(p0: int, p1: int, blocks: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """The prompt's queries cut at its bidirectional blocks: (start, end, causal) runs covering [p0, p1)."""
    runs, cursor = [], p0
    for b0, b1 in sorted(blocks):
        if not p0 <= cursor <= b0 < b1 <= p1:
            raise PackedAttentionError(f"bidirectional block {(b0, b1)} overlaps another or leaves its prompt {(p0, p1)}")
        if b0 > cursor:
            runs.append((cursor, b0, True))
        runs.append((b0, b1, False))
        cursor = b1
    if cursor < p1:
        runs.append((cursor, p1, True))
    return runs


def build_layout(prompt_spans: list[tuple[int, int]], completion_spans: list[list[tuple[int, int]]],
                 length: int, device: torch.device,
                 bidirectional: list[list[tuple[int, int]]] | None = None) -> PackedLayout:
    """``prompt_spans[i]`` = (start, end) of prompt i in the row; ``completion_spans[i]`` its completions'.

    ``bidirectional[i]``: spans of prompt i whose tokens attend to each other in both directions (Gemma 3's
    image tokens). Such a prompt becomes several sequences, each a run of its queries with the prompt's keys
    up to the run's end: causal for text runs, all-to-all for a block. Every sequence's queries are then the
    last of its keys, so one bottom-right alignment (and one sliding-window rule) serves all of them.
    """
    q_parts: list[torch.Tensor] = []
    k_parts: list[torch.Tensor] = []
    q_lens: list[int] = []
    k_lens: list[int] = []
    causal: list[bool] = []
    for i, ((p0, p1), comps) in enumerate(zip(prompt_spans, completion_spans, strict=True)):
        prompt = torch.arange(p0, p1, device=device)
        for r0, r1, is_causal in _prompt_runs(p0, p1, bidirectional[i] if bidirectional else []):
            q_parts.append(torch.arange(r0, r1, device=device))
            k_parts.append(prompt[:r1 - p0])
            q_lens.append(r1 - r0)
            k_lens.append(r1 - p0)
            causal.append(is_causal)
        for c0, c1 in comps:
            if c1 <= c0:
                continue
            own = torch.arange(c0, c1, device=device)
            q_parts.append(own)
            k_parts.append(torch.cat([prompt, own]))
            q_lens.append(c1 - c0)
            k_lens.append(p1 - p0 + c1 - c0)
            causal.append(True)

    def cumulative(lengths: list[int]) -> torch.Tensor:
        return torch.tensor([0, *lengths], dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)

    return PackedLayout(q_index=torch.cat(q_parts), k_index=torch.cat(k_parts), cu_q=cumulative(q_lens),
                        cu_k=cumulative(k_lens), max_q=max(q_lens), max_k=max(k_lens), length=length,
                        causal=None if all(causal) else tuple(causal))


# -- varlen kernels: (module, q (Tq,H,D), k (Tk,Hkv,D), v, layout, scaling, dropout, window) -> (Tq,H,D) ---
# window: the layer's sliding window (tokens a query sees, itself included) or None


def _allowed(lq: int, lk: int, causal: bool, window: int | None, device: torch.device) -> torch.Tensor | None:
    """True = attend; query i is key position lk - lq + i (a completion after its prompt, a prompt run after
    the prompt's earlier tokens). None = no restriction."""
    if not causal and window is None:
        return None
    q_pos = torch.arange(lk - lq, lk, device=device)[:, None]
    k_pos = torch.arange(lk, device=device)[None, :]
    allowed = k_pos <= q_pos if causal else torch.ones((lq, lk), dtype=torch.bool, device=device)
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)  # transformers' sliding_window_overlay
    return allowed



def _sdpa_varlen(module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout,
                 scaling: float | None, dropout: float, window: int | None = None) -> torch.Tensor:
    outs = []
    for s, (q0, q1, k0, k1) in enumerate(layout.spans()):
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1]))  # (1, H, len, D)
        lq, lk = q1 - q0, k1 - k0
        causal = layout.is_causal(s)
        plain_causal = causal and lq == lk and (window is None or window >= lk)
        mask = None if plain_causal else _allowed(lq, lk, causal, window, q.device)
        out = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, dropout_p=dropout, is_causal=plain_causal, scale=scaling,
            enable_gqa=qs.shape[1] != ks.shape[1])
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def _eager_varlen(module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout,
                  scaling: float | None, dropout: float, window: int | None = None) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    outs = []
    for s, (q0, q1, k0, k1) in enumerate(layout.spans()):
        qs = q[q0:q1].transpose(0, 1)  # (H, lq, D)
        ks = k[k0:k1].transpose(0, 1).repeat_interleave(groups, dim=0)
        vs = v[k0:k1].transpose(0, 1).repeat_interleave(groups, dim=0)
        scores = (qs @ ks.transpose(1, 2)) * scale
        allowed = _allowed(q1 - q0, k1 - k0, layout.is_causal(s), window, q.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qs.dtype)
        probs = torch.nn.functional.dropout(probs, p=dropout, training=dropout > 0)
        outs.append((probs @ vs).transpose(0, 1))
    return torch.cat(outs)


def _flash_varlen(base: str) -> Callable[..., torch.Tensor]:
    def call(module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
             scaling: float | None, dropout: float, window: int | None, causal: bool) -> torch.Tensor:
        from transformers.integrations.flash_attention import get_target_dtype
        from transformers.modeling_flash_attention_utils import _flash_attention_forward

        lengths_q, lengths_k = cu_q.diff(), cu_k.diff()
        # transformers' own flash path (kernel import, dtype handling, kwargs), in its varlen form; its window is
        # (window - 1) tokens each side, which with the bottom-right alignment is the causal window
        out = _flash_attention_forward(
            q[None], k[None], v[None], None, query_length=q.shape[0], is_causal=causal, dropout=dropout,
            softmax_scale=scaling, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=int(lengths_q.max()),
            max_length_k=int(lengths_k.max()), attn_implementation=base, sliding_window=window,
            target_dtype=get_target_dtype(q, module))
        return out.reshape(q.shape[0], q.shape[1], -1)

    def kernel(module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout,
               scaling: float | None, dropout: float, window: int | None = None) -> torch.Tensor:
        if layout.causal is None:
            return call(module, q, k, v, layout.cu_q, layout.cu_k, scaling, dropout, window, True)
        # bidirectional sequences (one image's tokens) run in a second, non-causal call; flash's window there
        # also limits keys to the right (window - 1 positions), so a block must fit in the window
        spans = layout.spans()
        if window is not None and any(q1 - q0 > window for s, (q0, q1, _, _) in enumerate(spans) if not layout.is_causal(s)):
            raise PackedAttentionError(f"flash-attention's window ({window} tokens) is shorter than a bidirectional "
                                       "image block: the varlen kernel cannot apply it; use attn_implementation=sdpa")
        out = q.new_empty(q.shape[:2] + (v.shape[-1],))
        for causal in (True, False):
            chosen = [sp for s, sp in enumerate(spans) if layout.is_causal(s) == causal]
            if not chosen:
                continue
            q_idx = torch.cat([torch.arange(q0, q1, device=q.device) for q0, q1, _, _ in chosen])
            k_idx = torch.cat([torch.arange(k0, k1, device=q.device) for _, _, k0, k1 in chosen])
            cu = [torch.tensor([0, *[b - a for a, b, _, _ in chosen]], device=q.device).cumsum(0, dtype=torch.int32),
                  torch.tensor([0, *[b - a for _, _, a, b in chosen]], device=q.device).cumsum(0, dtype=torch.int32)]
            out[q_idx] = call(module, q[q_idx], k[k_idx], v[k_idx], cu[0], cu[1], scaling, dropout, window, causal)
        return out
    return kernel


VARLEN_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": _sdpa_varlen,
    "eager": _eager_varlen,
    "flash_attention_2": _flash_varlen("flash_attention_2"),
    "flash_attention_3": _flash_varlen("flash_attention_3"),
}


def _original_attention(base: str, module: Any) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":  # eager is each model's own function, not a registered one
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


class _ConfigNamingBase:
    """A module's config as the library's own attention must see it: ``_attn_implementation`` is the
    base kernel's name. transformers' flash path passes that name to its lazy kernel import, which
    looks up a hub kernel for any name it does not know, so the grouped name would fail there."""

    def __init__(self, config: Any, base: str):
        self._config, self._attn_implementation = config, base

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


class _ModuleNamingBase:
    """The attention module with its config seen through :class:`_ConfigNamingBase`."""

    def __init__(self, module: Any, base: str):
        self._module, self.config = module, _ConfigNamingBase(module.config, base)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _unpacked_call(base: str, module: Any) -> tuple[Callable[..., Any], Any]:
    """The library's attention for a call without a packed layout (generation, prefill, evaluation),
    and the module to hand it."""
    if base.startswith("flash_attention"):
        return _original_attention(base, module), _ModuleNamingBase(module, base)
    return _original_attention(base, module), module


def _make_attention(base: str) -> Callable[..., Any]:
    kernel = VARLEN_KERNELS[base]

    def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, dropout: float = 0.0, scaling: float | None = None, **kwargs: Any):
        if not isinstance(attention_mask, PackedLayout):
            original, seen_as = _unpacked_call(base, module)
            return original(seen_as, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        layout = attention_mask
        b, heads, length, _ = query.shape
        if b != 1 or length != layout.length:
            raise PackedAttentionError(f"packed attention expects one row of {layout.length} tokens, "
                                       f"got query {tuple(query.shape)}")
        q = query[0].transpose(0, 1)  # (L, H, D)
        k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
        # the layer's sliding window, as its attention passes it to the attention function (None in full layers)
        window = kwargs.get("sliding_window")
        out = kernel(module, q.index_select(0, layout.q_index), k.index_select(0, layout.k_index),
                     v.index_select(0, layout.k_index), layout, scaling, dropout, window)
        KERNEL_CALLS[base] += 1
        full = out.new_zeros((length, heads, out.shape[-1])).index_copy(0, layout.q_index, out)
        return full[None], None

    attention.__name__ = f"{PREFIX}{base}"
    return attention


def grouped_name(base: str) -> str:
    return f"{PREFIX}{base}"


def base_implementation(name: str) -> str:
    return name.removeprefix(PREFIX)


LAYOUT_ATTRIBUTE = "r1mm_layout"


def _make_mask(base_mask: Callable[..., Any]) -> Callable[..., Any]:
    """The mask function registered with the grouped attention: for a packed row, the layout itself
    (carried by the row's 2-D attention mask, see :func:`layout_mask`); for any other call, the base
    implementation's mask, so generation with the grouped attention enabled gets the masks it always got."""

    def mask(*args: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
        layout = getattr(attention_mask, LAYOUT_ATTRIBUTE, None)
        if layout is not None:
            return layout
        return base_mask(*args, attention_mask=attention_mask, **kwargs)

    return mask


def register() -> None:
    """Register one grouped attention per supported base implementation (idempotent), with a mask
    function that hands the packed layout to the attention (and the base's mask to anything else)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    for base in SUPPORTED_BASES:
        name = grouped_name(base)
        if name in ALL_ATTENTION_FUNCTIONS:
            continue
        AttentionInterface.register(name, _make_attention(base))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, _make_mask(ALL_MASK_ATTENTION_FUNCTIONS[base]))


def text_config(model: torch.nn.Module) -> Any:
    config = model.config
    return getattr(config, "text_config", None) or config


# decoders whose sliding-window layers the grouped forward packs exactly (tests/test_family_gemma3.py): their
# attention passes its window to the attention function (``sliding_window``), which keeps each packed sequence's
# queries to it; other decoders' sliding layers stay refused until a test shows the same
WINDOWED_DECODERS = ("gemma3_text",)


def check_supported(config: Any, base: str) -> None:
    """Raise a one-line, actionable error for what the grouped forward cannot run (before weights load)."""
    if base not in SUPPORTED_BASES:
        raise PackedAttentionError(
            f"training.forward_mode=grouped has no kernel for attn_implementation={base!r} "
            f"(supported: {', '.join(SUPPORTED_BASES)}); pick one of those or set training.forward_mode=naive")
    text = getattr(config, "text_config", None) or config
    # linear-attention (Gated DeltaNet) layers: each completion starts from its prompt's states (packed_linear_attention)
    packed = {"full_attention", "linear_attention"}
    if getattr(text, "model_type", None) in WINDOWED_DECODERS:  # each packed sequence keeps its queries' window
        packed.add("sliding_attention")
    other = sorted(set(getattr(text, "layer_types", None) or []) - packed)
    if other:  # sliding-window (unverified decoders) or chunked layers
        raise PackedAttentionError(
            f"training.forward_mode=grouped packs completions for full- and linear-attention layers only, and "
            f"{type(config).__name__} also has {', '.join(other)} layers (packing them would let a completion see "
            "past its window); set training.forward_mode=naive")
    if getattr(text, "attn_logit_softcapping", None):  # Gemma 2 style: the varlen kernels do not cap logits
        raise PackedAttentionError(
            f"training.forward_mode=grouped does not cap attention logits ({type(config).__name__} has "
            f"attn_logit_softcapping={text.attn_logit_softcapping}); set training.forward_mode=naive")
    sliding = getattr(text, "sliding_window", None)
    flagged = getattr(text, "use_sliding_window", None)
    if sliding and (flagged or (flagged is None and not getattr(text, "layer_types", None))):
        raise PackedAttentionError(
            "training.forward_mode=grouped does not implement sliding-window attention "
            f"({type(config).__name__} has sliding_window={sliding}); set training.forward_mode=naive")


def enable(model: torch.nn.Module) -> str:
    """Route the language model's attention through the grouped function; returns the base implementation.

    Only the text sub-model changes: the vision tower keeps its own implementation.
    """
    register()
    text = text_config(model)
    current = text._attn_implementation or "sdpa"
    base = base_implementation(current)
    check_supported(model.config, base)
    if current != grouped_name(base):
        if text is model.config:
            model.set_attn_implementation(grouped_name(base))
        else:
            key = next(k for k in model.config.sub_configs if getattr(model.config, k) is text)
            model.set_attn_implementation({key: grouped_name(base)})
    return base


def is_enabled(model: torch.nn.Module) -> bool:
    return str(text_config(model)._attn_implementation or "").startswith(PREFIX)


def layout_mask(layout: PackedLayout, device: torch.device) -> torch.Tensor:
    """The packed row's attention mask as every model takes it: a (1, T) mask of ones carrying the layout.

    Why this form: each model builds its decoder's masks through transformers' ``create_causal_mask``
    (Qwen3-VL, GLM-4.1V), or accepts a prepared mapping instead (Qwen2-VL); the one input all of them
    pass on untouched is a 2-D bool mask (already bool and on the device, ``create_causal_mask``'s
    ``.to`` returns the same object). The mask function registered for the grouped attention
    (:func:`_make_mask`) returns the layout it carries, so every decoder layer receives the layout,
    also when gradient checkpointing recomputes it, and no (T x T) mask is ever built."""
    mask = torch.ones((1, layout.length), dtype=torch.bool, device=device)
    setattr(mask, LAYOUT_ATTRIBUTE, layout)
    return mask
