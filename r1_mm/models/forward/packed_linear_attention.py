"""Linear-attention (Gated DeltaNet) layers in the grouped forward's packed row.

Why: hybrid decoders (Qwen3.5, Qwen3-Next) interleave full attention with Gated DeltaNet layers, which carry
two states along the sequence: the last ``kernel - 1`` inputs of a short causal convolution and a
(key x value) recurrent state per head. In the packed row ``[p1 | c11 | c12 .. | p2 | ..]`` the library's
layer would run straight through, so ``c12`` would continue from the end of ``c11`` instead of from
``p1`` (up to 1.16 nats per token on a tiny Qwen3.5). Here every prompt runs once from empty states;
its final states are kept and all of its completions start from them, batched: the convolution sees
the prompt's last ``kernel - 1`` inputs in front of each completion and the gated delta rule starts from
the prompt's recurrent state. The prompt and the vision tower still run once per group (no framework
does this for hybrid models: they repeat the prompt per completion).

The layout reaches these layers the way it reaches attention: the row's 2-D mask carries it
(``packed_attention.layout_mask``); a pre-hook on the decoder stack hands it to every layer as the
prepared mask mapping the decoder accepts (``{"full_attention": layout, "linear_attention": layout}``),
so it survives gradient checkpointing's recompute. Calls without a layout (generation, the naive
forward) run the library's layer unchanged.

The computation calls the layer's own submodules (projections, ``conv1d``: LoRA and ZeRO-3's
parameter gathering see ordinary calls; the layer's own ``A_log`` and ``dt_bias`` are read inside its forward,
where ZeRO-3 has gathered them: grouped == naive training on 2 ZeRO-3 processes,
tests/test_family_qwen3_5.py) and the modeling module's own ``torch_chunk_gated_delta_rule``,
which transformers swaps for the flash-linear-attention kernel where one is installed: the same
kernel as the library's forward, with initial states.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import torch

from r1_mm.models.class_swap import swap_class
from r1_mm.models.forward.packed_attention import LAYOUT_ATTRIBUTE, PackedAttentionError, PackedLayout

LINEAR_ATTENTION = "linear_attention"
# packed linear-attention layer calls since import: lets tests assert the packed path ran for every such layer
LINEAR_CALLS: Counter[str] = Counter()
# what a Gated DeltaNet layer must have for the packed computation below to be the library's computation
REQUIRED = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "conv1d", "A_log", "dt_bias", "norm", "out_proj",
            "head_k_dim", "head_v_dim", "num_k_heads", "num_v_heads", "key_dim", "value_dim", "activation")
PACKED_MARKER = "r1mm_packed_base"  # on the swapped class: the library's own layer class


def linear_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's linear-attention token mixers (decoder layers of type ``linear_attention``)."""
    return [m.linear_attn for m in model.modules()
            if getattr(m, "block_type", getattr(m, "layer_type", None)) == LINEAR_ATTENTION and hasattr(m, "linear_attn")]


def _decoder_stacks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose ``layers`` hold linear-attention layers (they build the per-layer-type masks)."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "layers", None), torch.nn.ModuleList)
            and any(hasattr(layer, "linear_attn") for layer in m.layers)]


def _hand_layout_to_layers(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of a decoder stack: a packed row's mask becomes the prepared per-layer-type mapping."""
    layout = getattr(kwargs.get("attention_mask"), LAYOUT_ATTRIBUTE, None)
    if layout is None:
        return None
    types = set(module.config.layer_types)
    return args, dict(kwargs, attention_mask=dict.fromkeys(types, layout))


def _packed_methods(base: type) -> dict[str, Any]:
    """A forward that serves a packed layout and otherwise calls ``base``'s (the library's) forward."""

    def forward(self: Any, hidden_states: torch.Tensor, cache_params: Any = None, attention_mask: Any = None,
                **kwargs: Any) -> torch.Tensor:
        if isinstance(attention_mask, PackedLayout):
            if cache_params is not None:
                raise PackedAttentionError("a packed row is scored without a cache")
            return packed_forward(self, hidden_states, attention_mask)
        return base.forward(self, hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)

    return {"forward": forward}


def enable(model: torch.nn.Module) -> int:
    """Serve the model's linear-attention layers from the packed layout (idempotent); returns how many there are.

    Raises :class:`PackedAttentionError` for a linear-attention layer of another kind than Gated DeltaNet
    (its packed computation would not be the library's)."""
    if getattr(model, "r1mm_linear_layers", None) is not None:
        return model.r1mm_linear_layers
    layers = linear_layers(model)
    for layer in layers:
        missing = [name for name in REQUIRED if not hasattr(layer, name)]
        if missing or not hasattr(sys.modules[type(layer).__module__], "torch_chunk_gated_delta_rule"):
            raise PackedAttentionError(
                f"training.forward_mode=grouped knows Gated DeltaNet linear-attention layers only, and "
                f"{type(layer).__name__} lacks {missing or ['torch_chunk_gated_delta_rule']}; set "
                "training.forward_mode=naive")
        swap_class(layer, PACKED_MARKER, _packed_methods)
    for stack in _decoder_stacks(model):
        if not getattr(stack, "r1mm_layout_hook", False):
            stack.register_forward_pre_hook(_hand_layout_to_layers, with_kwargs=True)
            stack.r1mm_layout_hook = True
    model.r1mm_linear_layers = len(layers)
    return len(layers)


def _sequences(layout: PackedLayout) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(prompt token indices, [each completion's token indices]) per prompt, from the layout's sequences."""
    if layout.causal is not None:  # a prompt cut into runs (Gemma 3's image blocks): not one sequence per prompt
        raise PackedAttentionError("packed linear attention takes prompts without bidirectional blocks; no verified "
                                   "family has both; set training.forward_mode=naive")
    groups: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    for q0, q1, k0, k1 in layout.spans():
        tokens = layout.q_index[q0:q1]
        if q1 - q0 == k1 - k0:  # a prompt attends to itself only
            groups.append((tokens, []))
        else:
            if not groups or not torch.equal(layout.k_index[k0:k1 - (q1 - q0)], groups[-1][0]):
                raise PackedAttentionError("a completion in the packed row does not follow its prompt")
            groups[-1][1].append(tokens)
    return groups


def _right_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """(n, L, ...) parts -> (n, max L, ...) zero-padded on the right (after a causal sequence: never read)."""
    return torch.nn.utils.rnn.pad_sequence(parts, batch_first=True)


def _convolve(layer: Any, inputs: torch.Tensor, context: int) -> torch.Tensor:
    """The layer's causal convolution + activation over (n, L, C) inputs whose first ``context`` positions
    are the previous inputs (the state): their outputs are dropped. Returns (n, L - context, C)."""
    from transformers.activations import ACT2FN

    length = inputs.shape[1]
    out = layer.conv1d(inputs.transpose(1, 2))[:, :, :length]  # padding kernel-1 on both sides: keep the causal part
    return ACT2FN[layer.activation](out)[:, :, context:].transpose(1, 2)


def _delta_rule(layer: Any, mixed: torch.Tensor, beta: torch.Tensor, g: torch.Tensor,
                initial_state: torch.Tensor | None, final_state: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule over (n, L, conv_dim) convolved inputs, as the library's forward computes it."""
    n, length, _ = mixed.shape
    query, key, value = torch.split(mixed, [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
    query = query.reshape(n, length, -1, layer.head_k_dim)
    key = key.reshape(n, length, -1, layer.head_k_dim)
    value = value.reshape(n, length, -1, layer.head_v_dim)
    if layer.num_v_heads // layer.num_k_heads > 1:
        query = query.repeat_interleave(layer.num_v_heads // layer.num_k_heads, dim=2)
        key = key.repeat_interleave(layer.num_v_heads // layer.num_k_heads, dim=2)
    rule = sys.modules[type(layer).__module__].torch_chunk_gated_delta_rule
    return rule(query, key, value, g=g, beta=beta, initial_state=initial_state, output_final_state=final_state,
                use_qk_l2norm_in_kernel=True)


def packed_forward(layer: Any, hidden_states: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """The layer's output for a packed row (1, T, hidden): each completion continues from its prompt's states."""
    if hidden_states.shape[0] != 1 or hidden_states.shape[1] != layout.length:
        raise PackedAttentionError(f"packed linear attention expects one row of {layout.length} tokens, "
                                   f"got {tuple(hidden_states.shape)}")
    row = hidden_states[0]
    mixed = layer.in_proj_qkv(row)  # (T, conv_dim)
    beta = layer.in_proj_b(row).sigmoid()
    # in float32 as the library computes it (in half precision A would overflow to -inf)
    g = -layer.A_log.float().exp() * torch.nn.functional.softplus(layer.in_proj_a(row).float() + layer.dt_bias)
    context = layer.conv1d.kernel_size[0] - 1
    core = hidden_states.new_zeros((layout.length, layer.num_v_heads, layer.head_v_dim))
    for prompt, completions in _sequences(layout):
        convolved = _convolve(layer, mixed[prompt][None], 0)
        out, state = _delta_rule(layer, convolved, beta[prompt][None], g[prompt][None], None, True)
        core = core.index_copy(0, prompt, out[0].to(core.dtype))
        if not completions:
            continue
        tail = prompt[-context:] if context else prompt[:0]  # the convolution state: the prompt's last inputs
        lengths = [len(c) for c in completions]
        convolved = _convolve(layer, _right_padded([mixed[torch.cat([tail, c])] for c in completions]), len(tail))
        out, _ = _delta_rule(layer, convolved, _right_padded([beta[c] for c in completions]),
                             _right_padded([g[c] for c in completions]),
                             state.expand(len(completions), *state.shape[1:]).contiguous(), False)
        index = torch.cat(completions)
        flat = torch.cat([out[i, :n] for i, n in enumerate(lengths)])
        core = core.index_copy(0, index, flat.to(core.dtype))
    LINEAR_CALLS["linear_attention"] += 1
    z = layer.in_proj_z(row).reshape(-1, layer.head_v_dim)
    normed = layer.norm(core.reshape(-1, layer.head_v_dim), z)
    return layer.out_proj(normed.reshape(1, layout.length, -1))
