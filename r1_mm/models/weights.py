"""The policy's weights as (name, tensor) pairs in the checkpoint's own naming, ready for vLLM's loader.

Names and layouts: transformers 5 renames some weights when it loads a checkpoint (LLaVA-OneVision's
``vision_tower.vision_model.*`` becomes ``model.vision_tower.*``; MoE experts are fused) and reverts that
on ``save_pretrained``. vLLM's loaders read the checkpoint's format, not the in-memory one (a sync of
LLaVA-OneVision's in-memory names failed: "no module or parameter named 'vision_tower.embeddings'").
So every sync goes out through transformers' own reverse conversion (:func:`checkpoint_format`), not a
table per model.

Under ZeRO-3 parameters are gathered in buckets of ``bucket_mb`` (every rank must iterate: the
gather is collective), so no process ever holds the whole model for a sync. Under FSDP2 each parameter is a
DTensor (a shard per process, with the full shape) and is gathered alone (``full_tensor``, collective too). LoRA deltas are merged
on the fly (W + scale * B @ A); the adapter modules themselves are never sent, except by
``rollout.weight_sync_lora=adapter`` (:func:`save_lora_adapter`: the PEFT adapter alone, which vLLM serves as a LoRA
over the base weights it loaded once, unmerged: ``iter_policy_weights(merge_lora=False)``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / DeepSpeed / peft wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def _is_zero3(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def _size_bytes(param: torch.nn.Parameter) -> int:
    numel = param.ds_numel if _is_zero3(param) else param.numel()
    return numel * param.element_size()


def hf_name(name: str) -> str:
    """PEFT and wrapper prefixes removed: the name the base model's state dict uses."""
    for prefix in ("module.", "base_model.model."):
        name = name.removeprefix(prefix)
    name = name.replace(".base_layer.", ".")
    if ".modules_to_save." in name:
        head, _, tail = name.partition(".modules_to_save.")
        name = head + "." + tail.split(".", 1)[1]
    return name


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Parameter name of each LoRA-wrapped base weight -> its LoRA layer (empty without peft)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {f"{name}.base_layer.weight": module for name, module in model.named_modules()
            if isinstance(module, LoraLayer)}


def _lora_params(layer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in layer.named_parameters() if "lora_" in n]


def _merged(weight: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    if getattr(layer, "merged", False):
        return weight
    for adapter in layer.active_adapters:
        if adapter in getattr(layer, "lora_A", {}):
            weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    return weight


def _base_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters(remove_duplicate=False)
            if "lora_" not in n and ".original_module." not in n]


def checkpoint_conversions(model: torch.nn.Module) -> list[Any]:
    """transformers' conversions between ``model``'s checkpoint and in-memory weights, prefix changes included,
    with every transpose made unconditional.

    Why unconditional: transformers marks the fused-expert transposes (Qwen3-VL-MoE's ``gate_up_proj`` /
    ``down_proj``, stored (experts, in, out) in the checkpoint and (experts, out, in) in memory) as
    ``check_dims``: transpose only when the shape differs from the model's parameter. That reads legacy
    files of either layout, but reverting it compares an in-memory tensor with itself and never
    transposes, so ``save_pretrained`` writes the in-memory layout and vLLM, which always transposes
    these tensors, fails (gate_up) or silently loads a square tensor transposed (down_proj when the
    expert width equals the hidden size)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import Transpose

    conversions = copy.deepcopy(list(get_model_conversion_mapping(unwrap(model), add_legacy=False)))
    for conversion in conversions:
        for op in getattr(conversion, "operations", []):
            if isinstance(op, Transpose):
                op.check_dims = False
    return conversions


def checkpoint_format(model: torch.nn.Module) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A function taking base-model weights (in-memory names) to the checkpoint's names and layouts.

    transformers' ``revert_weight_conversion`` with the model class's current conversions, prefix changes
    included: the ones recorded at load depend on the file loaded (a checkpoint already in memory naming
    records no prefix change), and transformers drops prefix changes for a model built from a config,
    leaving names vLLM cannot place; transposes are always applied (:func:`checkpoint_conversions`). Each
    weight is converted alone (renames, and splits of fused tensors, are one-to-one or one-to-many), so the
    order of the weights is kept."""
    from transformers.core_model_loading import revert_weight_conversion

    holder = SimpleNamespace(_weight_conversions=checkpoint_conversions(model), config=unwrap(model).config)

    def convert(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not holder._weight_conversions:
            return weights
        return {k: v for name, tensor in weights.items() for k, v in revert_weight_conversion(holder, {name: tensor}).items()}

    return convert


def policy_weight_specs(model: torch.nn.Module) -> list[tuple[str, list[int], str]]:
    """(name, shape, dtype) of what :func:`iter_policy_weights` yields, in the same order (no gather: the
    conversion runs on meta tensors)."""
    convert = checkpoint_format(model)
    specs = []
    for n, p in _base_params(model):
        shape = p.ds_shape if _is_zero3(p) else p.shape
        for name, t in convert({hf_name(n): torch.empty(shape, dtype=p.dtype, device="meta")}).items():
            specs.append((name, list(t.shape), str(t.dtype)))
    return specs


def iter_policy_weights(model: torch.nn.Module, bucket_mb: int = 256,
                        merge_lora: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Every base-model weight once (tied ones under each name), LoRA merged (``merge_lora``; else the frozen base
    weights alone), gathered bucket by bucket."""
    lora = _lora_layers(model) if merge_lora else {}
    params = _base_params(model)
    convert = checkpoint_format(model)
    limit = bucket_mb * 2**20
    bucket: list[tuple[str, torch.nn.Parameter]] = []
    size = 0
    for item in params:
        bucket.append(item)
        size += _size_bytes(item[1])
        if size >= limit:
            yield from convert(dict(_emit(bucket, lora, model))).items()
            bucket, size = [], 0
    if bucket:
        yield from convert(dict(_emit(bucket, lora, model))).items()


def _emit(bucket: list[tuple[str, torch.nn.Parameter]], lora: dict[str, torch.nn.Module],
          root: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    to_gather = [p for _, p in bucket]
    adapters = []
    for name, _ in bucket:
        if name in lora:
            adapters += _lora_params(lora[name])
    to_gather += adapters
    context = contextlib.nullcontext()
    if any(_is_zero3(p) for p in to_gather):
        import deepspeed

        context = deepspeed.zero.GatheredParameters(to_gather, modifier_rank=None)
    elif any(_is_dtensor(p) for p in adapters):
        # FSDP2 + LoRA: PEFT's delta reads the adapter weights from its modules, so the units holding them are
        # unsharded (collective) for the bucket; the base weights are gathered one by one below
        from r1_mm.models.fsdp import fsdp_gathered

        context = fsdp_gathered(root, *adapters)
    with torch.no_grad(), context:  # context inside: FSDP2 units reshard on exit only without gradients
        for name, param in bucket:
            tensor = param.detach()
            if _is_dtensor(tensor):  # FSDP2: a shard here; every process gathers the full tensor
                tensor = tensor.full_tensor()
            if name in lora:
                tensor = _merged(tensor, lora[name])
            # a copy: gathered storage is released when the bucket's context closes
            yield hf_name(name), tensor.clone()


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def save_lora_adapter(model: torch.nn.Module, folder: Any) -> int:
    """The policy's PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) written to ``folder``, as
    vLLM's ``LoRARequest`` reads it; returns the bytes of the adapter tensors. One process only: a ZeRO-3 or FSDP2
    shard is refused (its adapter would have to be gathered first)."""
    peft_model, params = lora_adapter_of(model)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    return sum(p.numel() * p.element_size() for p in params)


def lora_adapter_of(model: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The PEFT model inside the policy and its adapter weights, or ValueError when an adapter-only sync cannot carry
    the policy (no adapter, other weights training, sharded adapters). Every rank can ask (vllm_pool: before rank 0
    alone writes the adapter)."""
    peft_model = model
    while not hasattr(peft_model, "peft_config"):
        if hasattr(peft_model, "module") and isinstance(peft_model.module, torch.nn.Module):
            peft_model = peft_model.module
        else:
            raise ValueError("rollout.weight_sync_lora=adapter: the policy has no LoRA adapter (model.lora)")
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    if trained := [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]:
        raise ValueError(f"rollout.weight_sync_lora=adapter: weights outside the adapters train ({trained[0]}, ...), "
                         "an adapter alone would not carry them; use rollout.weight_sync_lora=merged")
    if any(_is_zero3(p) or _is_dtensor(p) for p in params):
        raise ValueError("rollout.weight_sync_lora=adapter runs without ZeRO-3 / FSDP2 (sharded adapters); use merged")
    return peft_model, params


def policy_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a merged (full-weight) sync sends."""
    return sum(int(torch.Size(shape).numel()) * getattr(torch, dtype.removeprefix("torch.")).itemsize
               for _, shape, dtype in policy_weight_specs(model))
