"""FSDP2 units gathered for code that reads a module's weights directly instead of calling its forward (the tiled
LM-head kernel; PEFT's merge of LoRA adapters in the weight export), where FSDP2's pre-forward all-gather never
fires. Its own module because both the scoring layer and the weight export need it, and each imports the other's
layer for other things."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def fsdp_gathered(model: torch.nn.Module, *params: torch.Tensor | None) -> Iterator[None]:
    """FSDP2's counterpart of TRL's ``maybe_gather_lm_head_ctx``: the head's weight is read directly, never
    through the head's forward, so FSDP2's pre-forward hook (its all-gather) does not fire for it and the
    kernel would get a DTensor shard. The FSDP2 units owning ``params`` are unsharded here (a collective, on
    every process alike); the module attributes then hold the full tensors. With gradients on they stay
    unsharded until FSDP2's post-backward, which reduce-scatters their gradients (its final backward callback
    also covers a unit whose forward never ran); without, they are resharded on exit."""
    from torch.distributed.tensor import DTensor

    sharded = {id(p) for p in params if isinstance(p, DTensor)}
    if not sharded:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule) and any(
        id(fp.sharded_param) in sharded for g in m._get_fsdp_state()._fsdp_param_groups for fp in g.fsdp_params)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        if not torch.is_grad_enabled():
            for unit in units:
                unit.reshard()
