"""Learner back-ends through accelerate: single process, DDP, DeepSpeed ZeRO-2/3, FSDP2 (all over gloo on CPU).

The launch config (``accelerate launch --config_file recipes/accelerate/*.yaml``) picks the back-end
and the machine picks the device; the recipe never does. What accelerate does not cover is delegated
to TRL (a chosen dependency): its DeepSpeed preparation of the frozen reference model and its
parameter gathering for generation.

FSDP2 (``distributed_type: FSDP`` with ``fsdp_version: 2``, recipes/accelerate/fsdp2.yaml) is the alternative
to ZeRO-3: accelerate's ``fully_shard`` of every decoder layer / vision block, the embeddings and head, and the
root, so parameters, gradients and optimizer states are DTensors sharded over the processes. The reference
model is sharded too (TRL's ``prepare_fsdp``: one FSDP unit, gathered for each scoring forward). Weights leave
the learner gathered (``DTensor.full_tensor``, bucket by bucket, LoRA merged: models/weights.py). FSDP1 is
refused.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from r1_mm.config.recipe import ConfigError, RecipeConfig, accumulation
from r1_mm.models.loading import load_model, load_processor, prepare_model
from r1_mm.trainers.master_weights import make_optimizer, needs_master_weights

logger = logging.getLogger(__name__)


@dataclass
class Learner:
    accelerator: Accelerator
    processor: Any
    policy: torch.nn.Module  # wrapped (DDP / DeepSpeed engine) when distributed
    reference: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: Any

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.policy)

    @property
    def is_deepspeed(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    @property
    def is_fsdp(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.FSDP

    @property
    def zero_stage(self) -> int:
        if not self.is_deepspeed:
            return 0
        return int(self.accelerator.state.deepspeed_plugin.zero_stage)


def warmup_steps(training: Any) -> int:
    """``warmup_steps`` when set, else ``ceil(warmup_ratio * max_steps)`` (the HF Trainer's rounding)."""
    return training.warmup_steps or math.ceil(training.warmup_ratio * training.max_steps)


def _scheduler(optimizer: torch.optim.Optimizer, cfg: RecipeConfig) -> Any:
    from transformers import get_scheduler

    return get_scheduler(cfg.training.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(cfg.training),
                         num_training_steps=max(1, cfg.training.max_steps * cfg.algorithm.grpo.num_iterations))


def accelerator_kwargs(cfg: RecipeConfig, *, cuda: bool, deepspeed_launch: bool,
                       fsdp_launch: bool = False) -> dict[str, Any]:
    """How to construct the Accelerator so that the launch config's back-end really runs.

    With a GPU, accelerate's defaults are right (``training.use_cpu`` forces the CPU for DDP runs).
    Without one, accelerate needs telling: its multi-process CPU mode (gloo DDP) only starts with
    ``cpu=True``, but ``cpu=True`` also turns a DeepSpeed launch into plain DDP; and a DeepSpeed launch
    with ``cpu=False`` initialises a 2-process group while accelerate counts ONE process (both ranks
    rank 0) unless the gloo backend is named. An FSDP launch is started like a DeepSpeed one (gloo named;
    accelerate then counts both processes but, with no accelerator device, never selects FSDP itself:
    :func:`enable_fsdp_without_gpu`).
    """
    from accelerate.utils import InitProcessGroupKwargs

    steps, _ = accumulation(cfg.training)
    kwargs: dict[str, Any] = {"gradient_accumulation_steps": steps, "step_scheduler_with_optimizer": False}
    if cuda:
        kwargs["cpu"] = cfg.training.use_cpu and not deepspeed_launch and not fsdp_launch
    elif deepspeed_launch or fsdp_launch:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    else:
        kwargs["cpu"] = True
    return kwargs


MIXED_PRECISION_OF = {"bfloat16": "bf16", "float16": "fp16"}  # model.dtype -> the launch's mixed_precision


def precision_problem(cfg: RecipeConfig, *, mixed_precision: str, cuda: bool, deepspeed: bool) -> str | None:
    """The recipe's model.dtype and the launch's mixed precision must agree on a GPU: ``r1-mm plan`` and
    the recipe's header figures assume it, and a mismatch changes what runs: a bf16 model under 'no' gets
    float32 gradient buffers under DeepSpeed (outside DeepSpeed r1-mm keeps float32 master weights either
    way: trainers/master_weights.py); a float32 model under a DeepSpeed bf16 launch is cast to bf16.
    CPU runs (tests, CI) train in the recipe's dtype without autocast, so they are not checked.
    ``mixed_precision``: accelerate's resolved value (``Accelerator.mixed_precision``: the launch config's
    ``mixed_precision``, or a DeepSpeed JSON's explicit ``bf16`` / ``fp16`` section)."""
    if not cuda:
        return None
    wanted = MIXED_PRECISION_OF.get(cfg.model.dtype)
    if wanted and mixed_precision != wanted:
        return (f"model.dtype={cfg.model.dtype} but the launch runs mixed_precision '{mixed_precision}': launch with "
                f"mixed_precision: {wanted} (recipes/accelerate/zero3.yaml as shipped, or accelerate launch "
                f"--mixed_precision {wanted}), which `r1-mm plan --launch` and the recipe headers assume")
    if cfg.model.dtype == "float32" and deepspeed and mixed_precision in ("bf16", "fp16"):
        return (f"model.dtype=float32 but the DeepSpeed launch runs mixed_precision '{mixed_precision}', which casts "
                f"the model to {mixed_precision}: set model.dtype={'bfloat16' if mixed_precision == 'bf16' else 'float16'}"
                " or launch with --mixed_precision no")
    return None


def fsdp_launched() -> bool:
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_without_gpu(accelerator: Accelerator) -> None:
    """accelerate selects FSDP only for accelerator devices (its ``MULTI_GPU``-like types); on CPU processes
    over gloo it leaves ``distributed_type`` at NO although both processes are counted. torch's FSDP2 runs on
    CPU over gloo, so the launch's FSDP plugin is put in place here, in both of accelerate's shared states
    (the partial state decides collectives such as ``gather`` and barriers), as accelerate itself does on a GPU."""
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    if accelerator.num_processes < 2 or accelerator.distributed_type != DistributedType.NO:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* environment, as accelerate reads it
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def fsdp_problem(accelerator: Accelerator) -> str | None:
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    version = accelerator.state.fsdp_plugin.fsdp_version
    if version != 2:
        return (f"the launch runs FSDP version {version}; r1-mm supports FSDP2 only (fsdp_version: 2 in the launch's "
                "fsdp_config, as recipes/accelerate/fsdp2.yaml): its DTensor parameters are what the weight export, "
                "the reference model and checkpoints handle")
    return None


def make_accelerator(cfg: RecipeConfig) -> Accelerator:
    import os

    deepspeed_launch = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    fsdp_launch = fsdp_launched() and not deepspeed_launch
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(**accelerator_kwargs(cfg, cuda=cuda, deepspeed_launch=deepspeed_launch,
                                                   fsdp_launch=fsdp_launch))
    if fsdp_launch and not cuda:
        enable_fsdp_without_gpu(accelerator)
    if problem := fsdp_problem(accelerator):
        raise ConfigError(problem)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, cfg)
    if problem := precision_problem(cfg, mixed_precision=str(accelerator.mixed_precision),
                                    cuda=accelerator.device.type == "cuda",
                                    deepspeed=accelerator.distributed_type == DistributedType.DEEPSPEED):
        raise ConfigError(problem)  # before any model loads
    return accelerator


def configure_deepspeed(ds_config: dict[str, Any], cfg: RecipeConfig) -> None:
    """The recipe owns the accumulation: DeepSpeed's must agree (no dataloader is prepared, so
    accelerate cannot resolve its "auto" batch sizes by itself)."""
    steps, micro = accumulation(cfg.training)
    current = ds_config.get("gradient_accumulation_steps")
    if current in (None, "auto"):
        ds_config["gradient_accumulation_steps"] = steps
    elif int(current) != steps:
        recipe_says = (f"training.max_tokens_per_micro_batch sets it per step (the engine gets the bound, "
                       f"prompts_per_step={steps})" if cfg.training.max_tokens_per_micro_batch is not None
                       else f"the recipe's training.gradient_accumulation_steps is {steps}")
        raise ConfigError(f"the DeepSpeed config sets gradient_accumulation_steps={current} (accelerate's value when a "
                          f"JSON config omits it) but {recipe_says}: let "
                          "the recipe decide (\"gradient_accumulation_steps\": \"auto\" in the DeepSpeed JSON, nothing "
                          "in the accelerate YAML) or make both equal")
    if ds_config.get("train_micro_batch_size_per_gpu") in (None, "auto"):
        ds_config["train_micro_batch_size_per_gpu"] = micro
    if ds_config.get("gradient_clipping") in (None, "auto") and cfg.training.max_grad_norm:
        ds_config["gradient_clipping"] = cfg.training.max_grad_norm  # the recipe's max_grad_norm holds under DeepSpeed too
    if ds_config.get("train_batch_size") == "auto":
        del ds_config["train_batch_size"]  # DeepSpeed derives it: micro x accumulation x processes


def build_learner(cfg: RecipeConfig, *, need_reference: bool, accelerator: Accelerator | None = None,
                  processor: Any = None, model: torch.nn.Module | None = None) -> Learner:
    """Policy (and reference) loaded and prepared; the accelerator and processor may be made earlier,
    so that data and recipe problems are found before any weights load. ``model``: a model object
    (Python API) instead of model.name_or_path; the reference is a frozen copy of it as given."""
    accelerator = accelerator or make_accelerator(cfg)
    processor = processor if processor is not None else load_processor(cfg.model)
    grouped = cfg.training.forward_mode == "grouped"
    given_reference = None
    if model is not None:
        import copy

        if need_reference and not cfg.model.lora:
            given_reference = prepare_model(copy.deepcopy(model), cfg.model, trainable=False, grouped=grouped)
        policy = prepare_model(model, cfg.model, trainable=True, grouped=grouped)
    else:
        policy = load_model(cfg.model, trainable=True, grouped=grouped)
    check_unverified_family(policy, processor, grouped=grouped)
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters (frozen vision tower + no LoRA targets?)")
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and needs_master_weights(params) and accelerator.mixed_precision == "no":
        raise ConfigError(f"model.dtype={cfg.model.dtype} under FSDP2 with mixed_precision 'no' would update the "
                          "low-precision weights in place (no float32 master weights: FSDP2 swaps the optimizer's "
                          "parameters for its DTensors); launch with mixed_precision: bf16 (accelerate then keeps float32 "
                          "sharded weights and computes in bf16) or set model.dtype=float32")
    # DeepSpeed keeps its own masters; FSDP2 gets plain AdamW over its (float32, see above) DTensor parameters
    optimizer = make_optimizer(params, deepspeed=accelerator.distributed_type == DistributedType.DEEPSPEED or fsdp,
                               lr=cfg.training.learning_rate, weight_decay=cfg.training.weight_decay)
    scheduler = _scheduler(optimizer, cfg)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    reference = None
    if need_reference:
        if cfg.model.lora:
            reference = None  # the adapter-disabled policy is the reference: no second copy
        else:
            reference = given_reference or load_model(cfg.model, trainable=False, grouped=grouped)
            from r1_mm.models.trl_imports import trl_module

            if accelerator.distributed_type == DistributedType.DEEPSPEED:
                reference = trl_module("trl.models.utils").prepare_deepspeed(reference, accelerator)
            elif fsdp:  # sharded like the policy (one FSDP unit: gathered whole for each scoring forward)
                reference = trl_module("trl.models.utils").prepare_fsdp(reference.to(accelerator.device), accelerator)
            else:
                reference = reference.to(accelerator.device)
    return Learner(accelerator=accelerator, processor=processor, policy=policy, reference=reference,
                   optimizer=optimizer, scheduler=scheduler)


def check_unverified_family(policy: torch.nn.Module, processor: Any, *, grouped: bool) -> None:
    """A model whose family r1-mm has not verified (preflight let it through with the hf engine only) is
    trained only after the cheap contract passed on it (placeholders vs vision features, grouped vs naive
    logprobs: models/contract.py), before any sharding; otherwise the run stops in one line. Costs a
    float32 copy of the model when it is loaded in half precision, and a few seconds."""
    from r1_mm.models.families import is_verified

    config = getattr(policy, "config", None)
    if config is None or is_verified(config):
        return
    from r1_mm.models.contract import unverified_model_refusal

    line = unverified_model_refusal(policy, processor, grouped=grouped)
    if line:
        raise ConfigError(line)
    logger.warning("model_type '%s' is not a family r1-mm has verified; the cheap contract (placeholders, %s) "
                   "passed on it before step 1", config.model_type,
                   "grouped vs naive forward" if grouped else "the naive forward")


@contextlib.contextmanager
def generation_model(learner: Learner) -> Iterator[torch.nn.Module]:
    """The plain model for sampling; under ZeRO-3 its parameters are gathered for the duration.

    Gathering matters beyond speed: with partitioned weights every generated token is a collective,
    and ranks whose completions end at different lengths would wait on each other forever.
    """
    from r1_mm.models.trl_imports import trl_module

    gathered = fsdp_unsharded(learner.policy) if learner.is_fsdp else contextlib.nullcontext()
    with gathered, trl_module("trl.models.utils").unwrap_model_for_generation(learner.policy,
                                                                             learner.accelerator) as model:
        yield model


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def fsdp_unsharded(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every FSDP2 unit of ``model`` gathered (all-gathered once, collective) and kept gathered across the
    forwards inside (generate's per-token forwards then run no collective, so processes whose completions
    end at different lengths never wait on each other); resharded after. TRL's generation unwrap gathers
    nothing under FSDP2 (it relies on transformers' ``synced_gpus``, which a model prepared by accelerate
    does not trigger)."""
    units = fsdp_units(model)
    groups = [g for m in units for g in m._get_fsdp_state()._fsdp_param_groups]
    saved = [g.post_forward_mesh_info for g in groups]
    for g in groups:  # what FSDPModule.set_reshard_after_forward(False) sets, restorable without side effects
        g.post_forward_mesh_info = None
    try:
        for m in units:
            m.unshard()
        if any(is_dtensor(p) for p in model.parameters()):  # a shard left would make every token a collective
            raise RuntimeError("FSDP2: parameters still sharded after unshard(); generation would hang on uneven lengths")
        yield model
    finally:
        for g, info in zip(groups, saved, strict=True):
            g.post_forward_mesh_info = info
        for m in units:
            m.reshard()


def is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


@contextlib.contextmanager
def reference_model(learner: Learner) -> Iterator[torch.nn.Module]:
    """The frozen reference: a separate copy, or the policy with its LoRA adapter disabled."""
    if learner.reference is not None:
        yield learner.reference
        return
    peft_model = learner.unwrapped
    if not hasattr(peft_model, "disable_adapter"):
        raise RuntimeError("no reference model: beta > 0 needs a reference copy or a LoRA policy")
    with peft_model.disable_adapter():
        yield learner.policy


def sync_reference(learner: Learner, alpha: float) -> None:
    """ref <- alpha * policy + (1 - alpha) * ref (TR-DPO style periodic reference refresh)."""
    if learner.reference is None:
        return
    policy_params = dict(learner.unwrapped.named_parameters())
    ref = learner.accelerator.unwrap_model(learner.reference)
    gather = contextlib.nullcontext()
    if learner.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(policy_params.values()) + list(ref.parameters()),
                                                   modifier_rank=0)
    with gather, torch.no_grad():
        for name, p in ref.named_parameters():
            source = policy_params[name].detach()
            if is_dtensor(p):  # FSDP2: both sharded the same way (dim 0 over the same processes): local shards
                p, source = p.to_local(), source.to_local()
            p.mul_(1 - alpha).add_(source.to(p.dtype), alpha=alpha)


def _reference_gather(learner: Learner, modifier_rank: int | None) -> tuple[torch.nn.Module, Any]:
    ref = learner.accelerator.unwrap_model(learner.reference)
    if learner.zero_stage == 3:
        import deepspeed

        return ref, deepspeed.zero.GatheredParameters(list(ref.parameters()), modifier_rank=modifier_rank)
    return ref, contextlib.nullcontext()


def reference_state_dict(learner: Learner) -> dict[str, torch.Tensor] | None:
    """The reference's full weights on the main process (collective under ZeRO-3); None elsewhere."""
    ref, gather = _reference_gather(learner, None)
    with gather:
        if learner.is_fsdp:  # every process gathers each tensor (collective); the main one keeps them
            full = {n: p.detach().full_tensor().cpu() for n, p in ref.named_parameters()}
            return full if learner.accelerator.is_main_process else None
        if not learner.accelerator.is_main_process:
            return None
        return {n: p.detach().cpu().clone() for n, p in ref.named_parameters()}


def load_reference_state(learner: Learner, tensors: dict[str, torch.Tensor]) -> None:
    """Put saved reference weights back (a reference moved by ref_sync_steps or iterative rounds)."""
    ref, gather = _reference_gather(learner, 0)
    with gather, torch.no_grad():
        for name, p in ref.named_parameters():
            value = tensors[name].to(device=p.device, dtype=p.dtype)
            if is_dtensor(p):  # FSDP2: this process's shard of the full tensor every process loaded
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, p.device_mesh, p.placements)
            p.copy_(value)


def generate_groups(learner: Learner, engine: Any, samples: list, n: int, sampling: Any) -> list[list]:
    """G completions per sample. An engine that samples from the live policy (hf) gets the model
    gathered for the call (ZeRO-3); the others already hold the synced weights."""
    if getattr(engine, "samples_from_policy", False):
        with generation_model(learner) as model:
            engine.update_weights(model)
            results = engine.generate(samples, n, sampling)
    else:
        results = engine.generate(samples, n, sampling)
    return [r.completions for r in results]


def packed_tokens(prompt_tokens: int, completion_lengths: Sequence[int], mode: str) -> int:
    """The tokens one prompt group (a prompt and its completions; a preference pair) puts through the
    learner's forward, the unit of ``training.max_tokens_per_micro_batch``: ``grouped`` packs the prompt
    once (its visual tokens included) and every completion (tool turns included) without padding; ``naive``
    runs a row per completion, prompt repeated and padded to the group's longest completion."""
    if mode == "grouped":
        return prompt_tokens + sum(completion_lengths)
    return len(completion_lengths) * (prompt_tokens + max(completion_lengths, default=0))


def budget_split(tokens: Sequence[int], budget: int) -> list[range]:
    """Consecutive groups packed into micro-batches while their tokens stay within ``budget``: order kept,
    groups whole, a group over the budget alone in its own micro-batch. Greedy filling gives the fewest
    micro-batches any split into consecutive runs can."""
    parts, start, load = [], 0, 0
    for i, n in enumerate(tokens):
        if i > start and load + n > budget:
            parts.append(range(start, i))
            start, load = i, 0
        load += n
    if len(tokens):
        parts.append(range(start, len(tokens)))
    return parts


def split_to_count(parts: Sequence[range], tokens: Sequence[int], count: int) -> list[range]:
    """``parts`` split further until there are ``count`` of them: each time the heaviest part holding two
    or more groups is cut where its halves' tokens are most even. Parts stay consecutive, non-empty and
    within the budget they kept (a part only gets lighter)."""
    parts = list(parts)
    while len(parts) < count:
        splittable = [k for k, r in enumerate(parts) if len(r) > 1]
        if not splittable:
            raise ValueError(f"{len(tokens)} groups cannot fill {count} micro-batches (one group at least in each)")
        k = max(splittable, key=lambda k: sum(tokens[i] for i in parts[k]))
        r = parts[k]
        total = sum(tokens[i] for i in r)
        prefix, best, cut = 0, None, r.start + 1
        for c in range(r.start + 1, r.stop):
            prefix += tokens[c - 1]
            if best is None or abs(2 * prefix - total) < best:
                best, cut = abs(2 * prefix - total), c
        parts[k:k + 1] = [range(r.start, cut), range(cut, r.stop)]
    return parts


@dataclass(frozen=True)
class MicroBatches:
    """A step's split into micro-batches: consecutive ranges of its groups, and what each costs."""

    parts: list[range]
    tokens: list[int]  # per part: the learner tokens it packs
    over_budget: int = 0  # groups alone in a micro-batch because they alone exceed the budget
    fewest: int | None = None  # several processes under a budget: the fewest micro-batches any one needed

    def __iter__(self) -> Iterator[range]:
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    def metrics(self) -> dict[str, float]:
        out = {"train/micro_batches": float(len(self.parts)),
               "train/micro_batch_tokens_max": float(max(self.tokens, default=0))}
        if self.over_budget:
            out["train/over_budget_groups"] = float(self.over_budget)
        if self.fewest is not None:  # below train/micro_batches: some process split further to agree
            out["train/micro_batches_fewest"] = float(self.fewest)
        return out


def agreed_count(accelerator: Accelerator | None, local: int) -> tuple[int, int] | None:
    """(the largest, the fewest) micro-batch count of any process; None with one process. A collective:
    every process calls it."""
    if accelerator is None or accelerator.num_processes == 1:
        return None
    counts = accelerator.gather(torch.tensor([local], dtype=torch.long, device=accelerator.device))
    return int(counts.max()), int(counts.min())


def micro_batches(cfg: RecipeConfig, tokens: Sequence[int], accelerator: Accelerator | None = None) -> MicroBatches:
    """The step's groups (prompts with their completions, or pairs; ``tokens``: each one's
    :func:`packed_tokens`) split into micro-batches, in order.

    Without ``training.max_tokens_per_micro_batch``: the recipe's fixed split of equal row counts. With
    it: :func:`budget_split`, and with several processes every process runs the same number of
    micro-batches, the largest any of them needs; the others split their heaviest micro-batches further
    (:func:`split_to_count`). Why the same number: each micro-batch is a forward and a backward, and under
    DDP the last one all-reduces the gradients while under ZeRO-2/3 every backward reduce-scatters (ZeRO-3
    also all-gathers the weights in every forward), so a process with fewer would leave the others
    waiting in a collective forever. Why split rather than pad: a micro-batch without a group has no
    forward to run those collectives in, and a zero-weighted extra backward on a real group would cost a
    whole forward and backward; splitting costs nothing extra and keeps every micro-batch within the
    budget. It always succeeds, since every process holds prompts_per_step groups and no process needs
    more micro-batches than it has groups."""
    budget = cfg.training.max_tokens_per_micro_batch
    count = len(tokens)
    if budget is None:
        steps, size = accumulation(cfg.training)
        if count != steps * size:
            raise ValueError(f"a step of {count} prompts cannot be split into {steps} micro-batches of {size}")
        parts = [range(start, start + size) for start in range(0, count, size)]
        return MicroBatches(parts, [sum(tokens[i] for i in r) for r in parts])
    parts = budget_split(tokens, budget)
    over = [tokens[r.start] for r in parts if len(r) == 1 and tokens[r.start] > budget]
    if over:
        logger.warning("%d group(s) of this step exceed training.max_tokens_per_micro_batch=%d (largest %d tokens): "
                       "each runs as a micro-batch of its own", len(over), budget, max(over))
    agreed = agreed_count(accelerator, len(parts))
    if agreed is not None:
        parts = split_to_count(parts, tokens, agreed[0])
    return MicroBatches(parts, [sum(tokens[i] for i in r) for r in parts], over_budget=len(over),
                        fewest=agreed[1] if agreed is not None else None)


@contextlib.contextmanager
def accumulation_cycle(learner: Learner, count: int) -> Iterator[None]:
    """One optimizer step's ``count`` micro-batches: accelerate's accumulation counter restarts and counts to
    ``count`` (the step's own number under a token budget), so the last micro-batch, and only it, is the
    one that synchronises gradients (DDP all-reduce, DeepSpeed's boundary step)."""
    learner.accelerator.gradient_accumulation_steps = count
    learner.accelerator.step = 0
    yield


def backward_share(learner: Learner, loss_share: torch.Tensor) -> None:
    """Backward of one micro-batch's share of the step's loss (shares sum to the step's loss).

    accelerate (outside DeepSpeed: by its accumulation steps, set per step by :func:`accumulation_cycle`)
    and DeepSpeed (by its engine's configured accumulation steps) divide every backward, meant for losses
    that are means over a micro-batch; a share is already scaled, so that division is undone here."""
    if learner.is_deepspeed:
        divisor = learner.policy.gradient_accumulation_steps()
    else:
        divisor = learner.accelerator.gradient_accumulation_steps
    learner.accelerator.backward(loss_share * divisor)


def optimizer_step(learner: Learner, max_grad_norm: float | None) -> float | None:
    """Clip, step, advance the schedule once, clear gradients; returns the gradient norm if known.

    Under DeepSpeed the engine already stepped (and clipped, ``gradient_clipping``) inside the last
    micro-batch's backward; the optimizer wrapper's step is then a no-op."""
    grad_norm = None
    if learner.is_deepspeed:
        norm = learner.policy.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else None
    elif max_grad_norm:
        norm = learner.accelerator.clip_grad_norm_(learner.policy.parameters(), max_grad_norm)
        grad_norm = float(norm.full_tensor() if is_dtensor(norm) else norm)  # FSDP2: the norm over all shards
    learner.optimizer.step()
    learner.scheduler.step()
    learner.optimizer.zero_grad(set_to_none=True)
    return grad_norm
