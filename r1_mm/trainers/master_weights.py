"""AdamW with float32 master weights for a model held in bfloat16 or float16, outside DeepSpeed.

Why: a full fine-tuning step at the recipes' learning rates (1e-6, 5e-7) moves a weight of size ~1e-2
by ~1e-8, far below bfloat16's resolution there (~1e-4): updated in place in bf16, most updates round
away and the model does not train. DeepSpeed keeps fp32 master weights for a bf16 model; single-process
and DDP runs had nothing. This optimizer keeps an fp32 copy of every low-precision trainable parameter,
steps AdamW on the copies (so the optimizer states are fp32 too) and writes the rounded result back into
the model after every step. The model's forward stays in its dtype, so sampler and learner see the same
weights. Parameters that are already fp32 (LoRA adapters, which peft keeps in fp32) are stepped as they
are. The masters are part of ``state_dict`` so that resume is exact.
"""

from __future__ import annotations

from typing import Any

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def needs_master_weights(params: list[torch.nn.Parameter]) -> bool:
    return any(p.dtype in LOW_PRECISION for p in params)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW over fp32 masters of the given (possibly bf16/fp16) model parameters."""

    def __init__(self, params: list[torch.nn.Parameter], **kwargs: Any):
        self.model_params = list(params)
        masters = [p.detach().float().clone() if p.dtype in LOW_PRECISION else p for p in self.model_params]
        for master in masters:
            master.requires_grad_(True)
        super().__init__(masters, **kwargs)
        self.masters = masters

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for param in self.model_params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for param, master in zip(self.model_params, self.masters, strict=True):
            if master is not param:
                master.grad = None if param.grad is None else param.grad.float()
        loss = super().step(closure)
        for param, master in zip(self.model_params, self.masters, strict=True):
            if master is not param:
                param.copy_(master)
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["r1mm_master_weights"] = [m.detach().clone() if m is not p else None
                                        for p, m in zip(self.model_params, self.masters, strict=True)]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("r1mm_master_weights", None)
        super().load_state_dict(state_dict)
        if saved is None:  # a checkpoint written without masters: start them from the model's weights
            saved = [None if m is p else p.detach().float() for p, m in zip(self.model_params, self.masters,
                                                                          strict=True)]
        with torch.no_grad():
            for param, master, value in zip(self.model_params, self.masters, saved, strict=True):
                if master is not param and value is not None:
                    master.copy_(value.to(master.device, torch.float32))
                    param.copy_(master)


def make_optimizer(params: list[torch.nn.Parameter], *, deepspeed: bool, **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW for the learner: with fp32 masters for low-precision parameters unless DeepSpeed, which
    keeps its own masters (its bf16/fp16 optimizer wrappers)."""
    if not deepspeed and needs_master_weights(params):
        return MasterWeightAdamW(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)
