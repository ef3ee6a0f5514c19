"""Typed recipe schema: one YAML file holds everything a run needs.

Why dataclasses and a hand-written validator instead of a generic dict: every knob that a paper
ablates must be a named, typed field, and a typo in a recipe (``num_generation: 8``) must stop the
run with the field's full path and the closest valid name, not be silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from r1_mm.config.visual_budget import budget_problem


class ConfigError(ValueError):
    """A recipe that does not fit the schema; the message names the offending field."""


@dataclass
class ModelConfig:
    """The policy (and its reference copy) and how it is loaded."""

    name_or_path: str = "tiny:qwen2_5_vl"  # hub id, local folder, or tiny:<family>[:small] for built-ins
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    # the language model's and the vision tower's attention; flash_attention_* need CUDA and bf16/fp16
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    trust_remote_code: bool = False
    freeze_vision_tower: bool = False
    gradient_checkpointing: bool = False
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    tiny_seed: int = 0  # seed for built-in tiny models (tiny:...)


@dataclass
class MediaConfig:
    """Frame and pixel budgets: the same decoded media feed rollout, learner and critic."""

    min_pixels: int = 28 * 28 * 4  # per image
    max_pixels: int = 28 * 28 * 64  # per image
    video_min_pixels: int = 28 * 28 * 4  # per frame
    # per frame; null: 28 x 28 x 16 (or video_total_pixels spread over the frames). A stated value is what
    # every frame gets (visual_budget.py)
    video_max_pixels: int | None = None
    # whole video (pixels summed over the sampled frames); null: none. Stated with video_max_pixels, it must
    # hold max_frames (or nframes) x video_max_pixels, else the recipe is refused at load
    video_total_pixels: int | None = None
    nframes: int | None = None  # fixed frame count; when None, frames come from fps
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 16
    frame_factor: int = 2  # frame counts are multiples of this (Qwen's temporal patch size)
    on_bad_media: Literal["error", "skip"] = "error"


@dataclass
class DataConfig:
    """Where rows come from and how prompts are built from them."""

    train_path: str = ""  # a local file or folder (jsonl, json, parquet, csv, arrow, save_to_disk, data files)
    eval_path: str | None = None
    # instead of train_path: any datasets.load_dataset source (a hub id, a builder such as parquet / csv /
    # json / videofolder with data_files, a local dataset folder), and its splits
    dataset_name: str | None = None
    dataset_config: str | None = None
    data_files: Any = None  # load_dataset's data_files: a path, a list, or {split: paths}
    train_split: str = "train"
    eval_split: str | None = None
    # source column -> r1-mm column, e.g. {ground_truth: solution, question_type: problem_type}
    columns: dict[str, str] = field(default_factory=dict)
    # r1-mm media column -> a path built from the row's fields, e.g. {video: "{dataset}/{scene_name}.mp4"}
    media_template: dict[str, str] = field(default_factory=dict)
    media_root: str | None = None  # relative media paths resolve here (default: the data file's folder)
    system_prompt: str | None = None
    format_instruction: str | None = (
        "Think step by step inside <think></think> tags, then give the final answer inside "
        "<answer></answer> tags."
    )
    # appended after format_instruction when the row's problem_type is a key (Video-R1's per-type answer hints)
    format_instruction_by_type: dict[str, str] = field(default_factory=dict)
    max_prompt_length: int = 2048  # in tokens, visual tokens included
    on_long_prompt: Literal["drop", "error"] = "drop"
    max_rows: int | None = None
    shuffle: bool = True


@dataclass
class RolloutConfig:
    """How completions are sampled."""

    engine: str = "hf"
    num_generations: int = 4
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    # != 1 is refused with GRPO's rollout_is (the learner does not score it: docs/sampling.md)
    repetition_penalty: float = 1.0
    # vLLM engines (vllm_colocate, vllm_pool)
    vllm_dtype: str = "auto"  # "float32" on CPU makes sampler and learner numerics closest
    vllm_max_model_len: int = 8192
    vllm_max_images_per_prompt: int = 8
    vllm_max_videos_per_prompt: int = 1
    vllm_gpu_memory_utilization: float = 0.3  # colocate: the rollout engine's share of each GPU
    vllm_sleep_mode: bool = True  # colocate on GPU: free the KV cache and weights between rollouts
    vllm_tensor_parallel_size: int = 1
    vllm_data_parallel_size: int = 1  # pool servers only
    # vLLM's executor: auto = vLLM's choice (one process with one GPU; the learner's process group under
    # torchrun for the colocated engine); mp = worker processes that get pickled arguments (what tensor
    # parallel > 1 runs; selectable with 1 so this path is tested on one device)
    vllm_executor: Literal["auto", "mp"] = "auto"
    # vLLM's scheduler limits (None: vLLM's defaults, on GPUs 8192-16384 tokens and 256-1024 sequences per
    # step); the colocated engine at a low memory share wants a smaller token budget (docs/gpu.md)
    vllm_max_num_batched_tokens: int | None = None
    vllm_max_num_seqs: int | None = None
    weight_sync_bucket_mb: int = 256  # ZeRO-3: parameters are gathered and sent in buckets this large
    pool_servers: list[str] = field(default_factory=list)  # base URLs of running `r1-mm serve rollout`s
    pool_size: int = 2  # servers the pool starts itself (beside rank 0) when pool_servers is empty
    pool_gpu_memory_utilization: float = 0.9  # pool servers started by the run: share of each of their own GPUs
    # where those servers listen and are reached: default 127.0.0.1 on one machine, machine 0's address
    # (MASTER_ADDR) when the launch spans machines
    pool_host: str | None = None
    # those servers take concurrent requests (several ranks) into one running batch; false: one at a time
    # (on CPU sampling then does not depend on which ranks' requests overlap)
    pool_server_batching: bool = True
    pool_on_server_failure: Literal["restart", "fail"] = "restart"  # restart needs pool_weight_sync=shm
    # how weights reach the servers: shm = safetensors in /dev/shm (same host); broadcast = a process group
    # (NCCL on GPU, gloo on CPU) with every server worker; auto = shm when every server is on this host
    pool_weight_sync: Literal["auto", "shm", "broadcast"] = "auto"
    # rank 0's address as the servers reach it (broadcast sync); default: its address on the route to them
    pool_sync_host: str | None = None
    pool_request_timeout_s: float = 600.0
    # broadcast sync: each collective's deadline (learner and servers); the learner also stops as soon as a
    # server reports its side failed. Covers the first collective's NCCL connection set-up and, on servers,
    # the wait while the learner gathers the next ZeRO-3 bucket
    pool_sync_timeout_s: float = 300.0
    # environment variable holding the servers' API key (sent as a bearer token; never put in argv or logs)
    pool_api_key_env: str = "R1MM_ROLLOUT_API_KEY"
    pool_startup_timeout_s: float = 600.0


@dataclass
class RewardSpec:
    """One reward: a registered name, a dotted path ``pkg.mod:fn`` or a file path ``file.py:fn``."""

    name: str = ""
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    # how completions reach the function: text, or TRL's conversational [{"role": "assistant", "content": text}];
    # auto = messages for TRL's own reward functions (trl.rewards), text otherwise
    completions: Literal["auto", "text", "messages"] = "auto"
    # where the function runs: process = a worker process, killed at a time limit; inline = this process
    # (a limit stops only the wait); auto = process for user code named by path under a time limit
    isolation: Literal["auto", "process", "inline"] = "auto"


@dataclass
class RewardsConfig:
    functions: list[RewardSpec] = field(default_factory=list)
    on_error: Literal["raise", "none"] = "raise"  # a raising reward stops the run, or scores None
    timeout_s: float | None = None  # a reward call longer than this fails (and on_error applies); None = no limit
    batch_timeout_s: float | None = None  # all of one batch's reward calls together; None = no limit


@dataclass
class AlgorithmConfig:
    """Policy-optimisation knobs; names follow TRL's GRPOConfig where both have them."""

    name: Literal["grpo", "dpo", "tpo", "iterative_dpo"] = "grpo"
    beta: float = 0.04
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    importance_sampling_level: Literal["token", "sequence"] = "token"
    # weight the k3 KL term by the importance ratio pi/pi_old (TRL's use_bias_correction_kl, its default)
    kl_importance_weighting: bool = True
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    dynamic_sampling: bool = False
    max_resample_rounds: int = 3
    ref_sync_steps: int | None = None
    ref_sync_mix_alpha: float = 1.0
    advantage_estimator: str = "grpo"
    # T-GRPO (Video-R1): extra samples on shuffled frames; correct answers earn a bonus only when
    # ordered frames beat shuffled ones (ordered accuracy >= temporal_margin x shuffled accuracy).
    temporal_contrast: bool = False
    temporal_num_shuffled: int | None = None  # completions on shuffled frames (default: G // 2)
    temporal_bonus: float = 0.3
    temporal_margin: float = 0.8
    temporal_reward: str = "accuracy"  # the reward whose value decides "correct"
    temporal_correct_threshold: float = 0.5
    # Video-R1's length control: when more than one completion of a group is correct
    # (length_bonus_reward > length_bonus_threshold), the correct ones whose token count lies in
    # [length_bonus_min_tokens, length_bonus_max_tokens] earn length_bonus; 0 turns it off
    length_bonus: float = 0.0
    length_bonus_min_tokens: int = 320
    length_bonus_max_tokens: int = 512
    length_bonus_reward: str = "accuracy"
    length_bonus_threshold: float = 0.1
    # off-policy correction between the rollout engine's sampling logprobs and the learner's (TRL's modes):
    # token_/sequence_ x truncate (weights capped at rollout_is_cap) or mask (tokens/sequences outside
    # [rollout_is_floor, rollout_is_cap] are dropped); "none" turns it off
    rollout_is: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "token_truncate"
    rollout_is_cap: float = 3.0
    rollout_is_floor: float | None = None
    # preference learning (dpo, tpo): rows carry `chosen` and `rejected` responses
    dpo_loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    dpo_beta: float = 0.1
    label_smoothing: float = 0.0  # robust DPO: assumed share of flipped preference labels, in [0, 0.5)
    nll_weight: float = 0.0  # weight of the NLL (SFT) term on chosen responses: TPO's and RPO's extra loss
    precomputed_reference: bool = False  # read ref_chosen_logps / ref_rejected_logps columns instead of a forward
    # iterative DPO (LLaVA-OneVision-Chat with LLaVA-Critic): each round samples rollout.num_generations
    # responses for round_prompts prompts, scores them with rewards.functions (e.g. critic), pairs best vs
    # worst (ties skipped) and trains one DPO pass over them; the reference restarts from the policy
    round_prompts: int = 16
    reference_from_policy_each_round: bool = True


@dataclass
class TrainingConfig:
    output_dir: str = "runs/default"
    # a fresh run refuses a folder that holds another run's files; true deletes them first
    overwrite_output_dir: bool = False
    seed: int = 0
    max_steps: int = 10
    prompts_per_step: int = 2  # per process and optimizer step (rollouts are sampled for all of them at once)
    # the learner's forward/backward runs in micro-batches of prompts (with their G completions), the
    # gradients accumulated to exactly the full step's; set either field (the other follows)
    gradient_accumulation_steps: int | None = None  # micro-batches per optimizer step (default 1)
    micro_batch_size: int | None = None  # prompts per micro-batch (default prompts_per_step)
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # fraction of max_steps, used when warmup_steps is 0 (TRL / HF Trainer's name)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float = 1.0
    # the launch config (accelerate / DeepSpeed) and the machine decide the device; true forces the CPU
    # on a machine with GPUs (plain DDP/single process only: DeepSpeed runs where accelerate puts it)
    use_cpu: bool = False
    save_steps: int | None = None
    save_total_limit: int = 2
    eval_steps: int | None = None  # score data.eval_path every this many steps (and after the last)
    eval_samples: int = 1  # completions per eval prompt: 1 = greedy; k > 1 = k samples at rollout.temperature
    eval_max_rows: int | None = None
    eval_batch_size: int = 8
    resume_from: str | None = None  # "latest" (this run's newest checkpoint, if any) or a checkpoint folder
    max_nonfinite_steps: int = 3  # consecutive non-finite losses before the run saves and stops
    # grouped = prompt and media once per group, completions as varlen sequences (any attention above);
    # naive = G repeated sequences (the library way)
    forward_mode: Literal["grouped", "naive"] = "grouped"


@dataclass
class LoggingConfig:
    # accelerate's trackers by name (wandb, tensorboard, mlflow, ...) or a plugin file.py:Class
    report_to: list[str] = field(default_factory=list)
    # per tracker, keyword arguments for its start (e.g. {wandb: {tags: [a]}, tensorboard: {flush_secs: 30}})
    tracker_kwargs: dict[str, Any] = field(default_factory=dict)
    project: str = "r1-mm"
    run_name: str | None = None
    group: str | None = None
    logging_steps: int = 1
    table_steps: int = 10  # W&B completions table (with images / frames) every this many steps
    # share of each step's groups written to completions.jsonl (1 = every group, 0 = none; for big runs)
    completions_sample_rate: float = 1.0
    progress_bar: bool = True


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecipeConfig:
        """A recipe from a dict of sections, checked as a YAML recipe is (types, names, bounds)."""
        return validate(build_dataclass(cls, data))


# --------------------------------------------------------------------------------------------
# Building a typed config from plain data


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(choices))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; returns the (possibly converted) value.

    Conversions are the ones YAML and ``key=value`` overrides make necessary: ints where floats are
    expected, and a lone value where a list is expected is *not* accepted (ambiguous in sweeps).
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {list(args)}, got {value!r}" + (
                _suggest(str(value), [str(a) for a in args]) if isinstance(value, str) else ""))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and tp is RewardSpec:
            value = {"name": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{path}: unsupported type {tp}")


def build_dataclass(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Instantiate ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in hints:
            raise ConfigError(f"unknown key '{full}'" + _suggest(str(key), names))
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to nested plain data (values parsed as YAML scalars/lists)."""
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{key}' is not a section")
        node[keys[-1]] = value
    return data


def validate(cfg: RecipeConfig) -> RecipeConfig:
    """Cross-field checks that the type system cannot express."""
    problems = []
    if cfg.rollout.num_generations < 2 and cfg.algorithm.name == "grpo":
        problems.append("rollout.num_generations must be >= 2 for GRPO (group advantages need a group)")
    if cfg.media.min_frames > cfg.media.max_frames:
        problems.append("media.min_frames must be <= media.max_frames")
    if cfg.media.min_pixels > cfg.media.max_pixels:
        problems.append("media.min_pixels must be <= media.max_pixels")
    if cfg.media.video_max_pixels is not None and cfg.media.video_min_pixels > cfg.media.video_max_pixels:
        problems.append("media.video_min_pixels must be <= media.video_max_pixels")
    if budget := budget_problem(cfg.media):
        problems.append(budget)
    if cfg.media.nframes is not None and cfg.media.nframes < 1:
        problems.append("media.nframes must be >= 1")
    if cfg.media.fps <= 0:
        problems.append("media.fps must be > 0")
    if cfg.algorithm.epsilon_high is not None and cfg.algorithm.epsilon_high < cfg.algorithm.epsilon:
        problems.append("algorithm.epsilon_high must be >= algorithm.epsilon")
    if cfg.algorithm.beta < 0:
        problems.append("algorithm.beta must be >= 0")
    if cfg.data.max_prompt_length < 1:
        problems.append("data.max_prompt_length must be >= 1")
    if not cfg.training.output_dir.strip():
        problems.append("training.output_dir is empty (the run would write into the working directory); "
                        "give a folder, e.g. training.output_dir=runs/my-run")
    needed = cfg.data.max_prompt_length + cfg.rollout.max_completion_length
    if cfg.rollout.engine.startswith("vllm") and cfg.rollout.vllm_max_model_len < needed:
        problems.append(f"rollout.vllm_max_model_len ({cfg.rollout.vllm_max_model_len}) is below "
                        f"data.max_prompt_length + rollout.max_completion_length ({needed}): vLLM would reject "
                        "the longest prompts the data allows")
    problems += _accumulation_problems(cfg.training)
    problems += _bound_problems(cfg)
    problems += _unscored_sampling_problems(cfg)
    if cfg.algorithm.name in ("grpo", "iterative_dpo") and cfg.rollout.temperature == 0:
        problems.append(f"rollout.temperature is 0 (greedy): the {cfg.rollout.num_generations} samples of each prompt "
                        f"would all be the same answer and {cfg.algorithm.name} would learn nothing; use a temperature > 0")
    if cfg.model.attn_implementation.startswith("flash_attention") and cfg.model.dtype == "float32":
        problems.append(f"model.attn_implementation={cfg.model.attn_implementation} needs model.dtype bfloat16 or "
                        "float16 (flash-attention has no float32 kernels); or use attn_implementation=sdpa")
    names = [f.name for f in cfg.rewards.functions]
    if cfg.algorithm.length_bonus and cfg.algorithm.length_bonus_reward not in names:
        problems.append(f"algorithm.length_bonus_reward {cfg.algorithm.length_bonus_reward!r} must name one of "
                        f"rewards.functions ({', '.join(names) or 'none'}): its score decides which answers are correct")
    for i, spec in enumerate(cfg.rewards.functions):
        if not spec.name:
            problems.append(f"rewards.functions[{i}].name is empty")
    if problems:
        raise ConfigError("invalid recipe: " + "; ".join(problems))
    return cfg


# rollout settings that change the logprobs the engines report (vLLM's processed_logprobs are taken after
# its penalties; the hf engine records them after transformers' own processors) but that the learner's
# scoring does not reproduce (docs/sampling.md), with the value at which they do nothing
UNSCORED_SAMPLING = {"repetition_penalty": 1.0}


def _unscored_sampling_problems(cfg: RecipeConfig) -> list[str]:
    """Refuse a sampling setting the learner does not score when the sampler's logprobs are used.

    Why: GRPO's ``algorithm.rollout_is`` weights each token by exp(learner - sampler). A repetition
    penalty moves the sampler's distribution per position by the tokens seen so far (prompt included,
    with engine-specific prompt ids), so that ratio is not 1 even at identical weights and the
    correction would reweight every token by the penalty, not by off-policy drift. Nothing else reads
    the sampler's logprobs (DPO variants, ``rollout_is: none``), so the setting stays allowed there."""
    if cfg.algorithm.name != "grpo" or cfg.algorithm.rollout_is == "none":
        return []
    return [f"rollout.{name}={getattr(cfg.rollout, name)} changes the rollout engines' logprobs in a way the learner "
            f"does not reproduce, so algorithm.rollout_is={cfg.algorithm.rollout_is} would reweight tokens by a ratio "
            f"that is not 1 at identical weights: set rollout.{name}={neutral:g} or algorithm.rollout_is=none"
            for name, neutral in UNSCORED_SAMPLING.items() if getattr(cfg.rollout, name) != neutral]


# (field, lowest allowed, inclusive, highest allowed, inclusive): numbers a run cannot use, found at load
_BOUNDS: list[tuple[str, float | None, bool, float | None, bool]] = [
    ("rollout.num_generations", 1, True, None, False),
    ("rewards.timeout_s", 0, False, None, False),
    ("rewards.batch_timeout_s", 0, False, None, False),
    ("rollout.max_completion_length", 1, True, None, False),
    ("rollout.temperature", 0, True, None, False),  # 0 = greedy (one answer per prompt: TPO pair building)
    ("rollout.top_p", 0, False, 1, True),
    ("rollout.top_k", 1, True, None, False),
    ("rollout.repetition_penalty", 0, False, None, False),
    ("rollout.vllm_gpu_memory_utilization", 0, False, 1, True),
    ("rollout.pool_size", 1, True, None, False),
    ("rollout.pool_gpu_memory_utilization", 0, False, 1, True),
    ("rollout.weight_sync_bucket_mb", 1, True, None, False),
    ("algorithm.epsilon", 0, False, None, False),
    ("algorithm.num_iterations", 1, True, None, False),
    ("algorithm.max_resample_rounds", 0, True, None, False),
    ("algorithm.ref_sync_steps", 1, True, None, False),
    ("algorithm.ref_sync_mix_alpha", 0, False, 1, True),
    ("algorithm.rollout_is_cap", 0, False, None, False),
    ("algorithm.dpo_beta", 0, False, None, False),
    ("algorithm.label_smoothing", 0, True, 0.5, False),
    ("algorithm.nll_weight", 0, True, None, False),
    ("algorithm.round_prompts", 1, True, None, False),
    ("training.max_steps", 1, True, None, False),
    ("training.learning_rate", 0, True, None, False),
    ("training.weight_decay", 0, True, None, False),
    ("training.warmup_steps", 0, True, None, False),
    ("training.warmup_ratio", 0, True, 1, False),
    ("training.max_grad_norm", 0, True, None, False),
    ("training.save_steps", 1, True, None, False),
    ("training.save_total_limit", 1, True, None, False),
    ("training.eval_steps", 1, True, None, False),
    ("training.eval_samples", 1, True, None, False),
    ("training.eval_batch_size", 1, True, None, False),
    ("training.max_nonfinite_steps", 1, True, None, False),
    ("rollout.vllm_max_model_len", 1, True, None, False),
    ("rollout.vllm_max_images_per_prompt", 0, True, None, False),
    ("rollout.vllm_max_videos_per_prompt", 0, True, None, False),
    ("rollout.vllm_tensor_parallel_size", 1, True, None, False),
    ("rollout.vllm_data_parallel_size", 1, True, None, False),
    ("rollout.vllm_max_num_batched_tokens", 1, True, None, False),
    ("rollout.vllm_max_num_seqs", 1, True, None, False),
    ("rollout.pool_request_timeout_s", 0, False, None, False),
    ("rollout.pool_sync_timeout_s", 0, False, None, False),
    ("rollout.pool_startup_timeout_s", 0, False, None, False),
    ("algorithm.temporal_num_shuffled", 1, True, None, False),
    ("algorithm.rollout_is_floor", 0, True, None, False),
    ("data.max_rows", 1, True, None, False),
    ("training.eval_max_rows", 1, True, None, False),
    ("model.lora_r", 1, True, None, False),
    ("model.lora_dropout", 0, True, 1, False),
    ("logging.logging_steps", 1, True, None, False),
    ("logging.table_steps", 1, True, None, False),
    ("logging.completions_sample_rate", 0, True, 1, True),
    ("media.min_frames", 1, True, None, False),
    ("media.frame_factor", 1, True, None, False),
    ("media.min_pixels", 1, True, None, False),
    ("media.video_total_pixels", 1, True, None, False),
    ("media.video_max_pixels", 1, True, None, False),
]


def _finite_problems(cfg: RecipeConfig) -> list[str]:
    """Every number of the recipe is finite: a NaN passes every comparison (``beta=nan`` skipped every
    update and the run exited 0) and ``inf`` passes every lower bound (``learning_rate=inf``)."""
    found = []
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                found.append(f"{section.name}.{f.name} must be a finite number, got {value!r}")
    for i, spec in enumerate(cfg.rewards.functions):
        if not math.isfinite(spec.weight):
            found.append(f"rewards.functions[{i}].weight must be a finite number, got {spec.weight!r}")
    return found


def _bound_problems(cfg: RecipeConfig) -> list[str]:
    found = _finite_problems(cfg)
    for path, low, low_in, high, high_in in _BOUNDS:
        section, name = path.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):  # reported above
            continue
        below = low is not None and (value < low if low_in else value <= low)
        above = high is not None and (value > high if high_in else value >= high)
        if below or above:
            lo = "" if low is None else f"{'>=' if low_in else '>'} {low:g}"
            hi = "" if high is None else f"{'<=' if high_in else '<'} {high:g}"
            found.append(f"{path} must be {' and '.join(x for x in (lo, hi) if x)}, got {value!r}")
    return found


def _accumulation_problems(t: TrainingConfig) -> list[str]:
    """prompts_per_step = gradient_accumulation_steps x micro_batch_size, whichever of the two is given."""
    if t.prompts_per_step < 1:
        return ["training.prompts_per_step must be >= 1"]
    for name in ("gradient_accumulation_steps", "micro_batch_size"):
        value = getattr(t, name)
        if value is not None and value < 1:
            return [f"training.{name} must be >= 1"]
    steps, micro = t.gradient_accumulation_steps, t.micro_batch_size
    if steps is not None and micro is not None and steps * micro != t.prompts_per_step:
        return [f"training.gradient_accumulation_steps ({steps}) x training.micro_batch_size ({micro}) must equal "
                f"training.prompts_per_step ({t.prompts_per_step}); set only one of the two"]
    divisor = steps if steps is not None else micro
    if divisor is not None and t.prompts_per_step % divisor:
        name = "gradient_accumulation_steps" if steps is not None else "micro_batch_size"
        return [f"training.{name} ({divisor}) must divide training.prompts_per_step ({t.prompts_per_step})"]
    return []


def accumulation(t: TrainingConfig) -> tuple[int, int]:
    """(gradient_accumulation_steps, micro_batch_size) of a validated training section."""
    if t.gradient_accumulation_steps is not None:
        return t.gradient_accumulation_steps, t.prompts_per_step // t.gradient_accumulation_steps
    if t.micro_batch_size is not None:
        return t.prompts_per_step // t.micro_batch_size, t.micro_batch_size
    return 1, t.prompts_per_step


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def read_recipe_data(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file as plain data. ``extends: other.yaml`` (relative to this file) starts from that
    recipe and deep-merges this one over it, so a model-size variant states only what differs."""
    path = Path(path).resolve()
    if not path.exists():
        raise ConfigError(f"recipe file not found: {path}")
    if path in _seen:
        raise ConfigError(f"recipe {path} extends itself (through {' -> '.join(p.name for p in _seen)})")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML ({problem}); fix the recipe file") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(loaded).__name__}")
    data = loaded or {}
    base = data.pop("extends", None)
    if base is not None:
        data = _deep_merge(read_recipe_data(path.parent / str(base), (*_seen, path)), data)
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a recipe YAML (or start from defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = read_recipe_data(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    cfg = build_dataclass(RecipeConfig, data)
    return validate(cfg)


def dump_recipe(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
