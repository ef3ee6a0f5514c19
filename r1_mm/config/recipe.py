"""Typed recipe schema: one YAML file holds everything a run needs.

Why dataclasses and a hand-written validator instead of a generic dict: every knob that a paper
ablates must be a named, typed field, and a typo in a recipe (``num_generation: 8``) must stop the
run with the field's full path and the closest valid name, not be silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from r1_mm.config.algorithms import algorithm_spec
from r1_mm.config.visual_budget import budget_problem
from r1_mm.core import cpu_cores
from r1_mm.core.registry import suggest


class ConfigError(ValueError):
    """A recipe that does not fit the schema; the message names the offending field."""


@dataclass
class ModelConfig:
    """The policy (and its reference copy) and how it is loaded."""

    name_or_path: str = field(default="tiny:qwen2_5_vl", metadata={
        "help": "hub id, local folder, an r1-mm run folder (its last checkpoint's model: GRPO after an SFT run), or "
                "tiny:FAMILY[:small][:tools] for the built-in tiny models (r1-mm make-tiny)"})
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(default="float32", metadata={
        "help": "dtype the weights are loaded in (auto: the checkpoint's own)"})
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = field(
        default="sdpa", metadata={"help": "the language model's and the vision tower's attention; flash_attention_* "
                                          "need CUDA and bfloat16/float16"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "let transformers run the model repository's own code (model and processor)"})
    freeze_vision_tower: bool = field(default=False, metadata={
        "help": "no gradients for the vision tower and its projector (the language model still trains)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in backward (non-reentrant) to save memory"})
    lora: bool = field(default=False, metadata={
        "help": "train LoRA adapters on the language model's linear layers instead of all weights"})
    lora_vision: bool = field(default=False, metadata={
        "help": "model.lora: also put adapters on the vision tower's and projector's linear layers (the family's "
                "lora_vision_targets: Qwen2-VL, Qwen2.5-VL, Qwen3-VL; other families are refused)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA adapters' input, in [0, 1)"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                 "gate_up_proj", "in_proj_qkv", "in_proj_z", "out_proj"],
        metadata={"help": "names of the language model's linear layers that get adapters (the vision tower's: "
                          "model.lora_vision); the "
                          "default covers every family's attention and MLP projections (GLM's fused gate_up_proj, "
                          "Qwen3.5's linear-attention in_proj_qkv / in_proj_z / out_proj)"})
    tiny_seed: int = field(default=0, metadata={"help": "seed of the built-in tiny models' random weights (tiny:...)"})


@dataclass
class MediaConfig:
    """Frame and pixel budgets: the same decoded media feed rollout, learner and critic."""

    min_pixels: int = field(default=28 * 28 * 4, metadata={"help": "fewest pixels per image (images are resized up)"})
    max_pixels: int = field(default=28 * 28 * 64, metadata={"help": "most pixels per image (images are resized down)"})
    video_min_pixels: int = field(default=28 * 28 * 4, metadata={"help": "fewest pixels per video frame"})
    video_max_pixels: int | None = field(default=None, metadata={
        "help": "pixels per video frame; null: 28 x 28 x 16 (or video_total_pixels spread over the frames). A "
                "stated value is what every frame gets (visual_budget.py)"})
    video_total_pixels: int | None = field(default=None, metadata={
        "help": "pixels of a whole video (summed over the sampled frames); null: no limit. Stated with "
                "video_max_pixels, it must hold max_frames (or nframes) x video_max_pixels, else the recipe is "
                "refused at load"})
    nframes: int | None = field(default=None, metadata={
        "help": "a fixed frame count per video; null: frames are sampled at fps"})
    fps: float = field(default=2.0, metadata={
        "help": "frames sampled per second of video (when nframes is null), kept within min_frames..max_frames"})
    min_frames: int = field(default=4, metadata={"help": "fewest frames sampled from a video"})
    max_frames: int = field(default=16, metadata={"help": "most frames sampled from a video"})
    frame_factor: int = field(default=2, metadata={
        "help": "frame counts are multiples of this (Qwen's temporal patch size)"})
    on_bad_media: Literal["error", "skip"] = field(default="error", metadata={
        "help": "a missing or undecodable image/video stops the run (error) or leaves its row out (skip)"})


@dataclass
class DataConfig:
    """Where rows come from and how prompts are built from them."""

    train_path: str = field(default="", metadata={
        "help": "a local file or folder (jsonl, json, parquet, csv, arrow, save_to_disk, data files)"})
    eval_path: str | None = field(default=None, metadata={
        "help": "a local file or folder of evaluation rows (read by training.eval_steps and r1-mm eval)"})
    dataset_name: str | None = field(default=None, metadata={
        "help": "instead of train_path: any datasets.load_dataset source (a hub id, a builder such as parquet / "
                "csv / json / videofolder with data_files, a local dataset folder)"})
    dataset_config: str | None = field(default=None, metadata={
        "help": "with dataset_name: load_dataset's configuration name"})
    data_files: Any = field(default=None, metadata={
        "help": "with dataset_name: load_dataset's data_files (a path, a list, or {split: paths})"})
    train_split: str = field(default="train", metadata={"help": "with dataset_name: the split trained on"})
    eval_split: str | None = field(default=None, metadata={
        "help": "with dataset_name: the split evaluated on; null: no evaluation rows"})
    columns: dict[str, str] = field(default_factory=dict, metadata={
        "help": "source column -> r1-mm column, e.g. {ground_truth: solution, question_type: problem_type}"})
    media_template: dict[str, str] = field(default_factory=dict, metadata={
        "help": "r1-mm media column -> a path built from the row's fields, e.g. "
                "{video: \"{dataset}/{scene_name}.mp4\"}"})
    media_root: str | None = field(default=None, metadata={
        "help": "relative media paths resolve here (default: the data file's folder)"})
    system_prompt: str | None = field(default=None, metadata={
        "help": "a system message put first in each prompt (unless the row brings its own)"})
    format_instruction: str | None = field(default=(
        "Think step by step inside <think></think> tags, then give the final answer inside "
        "<answer></answer> tags."
    ), metadata={"help": "text appended to the last user message (the answer format the rewards expect); null: none"})
    format_instruction_by_type: dict[str, str] = field(default_factory=dict, metadata={
        "help": "appended after format_instruction when the row's problem_type is a key (Video-R1's per-type "
                "answer hints)"})
    max_prompt_length: int = field(default=2048, metadata={"help": "prompt length in tokens, visual tokens included"})
    on_long_prompt: Literal["drop", "error"] = field(default="drop", metadata={
        "help": "a prompt longer than max_prompt_length is left out (drop) or stops the run (error)"})
    max_rows: int | None = field(default=None, metadata={"help": "use only the first this many rows; null: all"})
    shuffle: bool = field(default=True, metadata={
        "help": "visit the rows in a new seeded order each epoch (training.seed); false: file order"})


@dataclass
class RolloutConfig:
    """How completions are sampled."""

    engine: str = field(default="hf", metadata={
        "help": "rollout engine: hf (transformers' generate in the learner), vllm_colocate (vLLM in each learner "
                "process), vllm_pool (vLLM servers), or a registered plugin's name"})
    num_generations: int = field(default=4, metadata={
        "help": "completions sampled per prompt (G, the group size); GRPO needs >= 2"})
    max_completion_length: int = field(default=64, metadata={"help": "most new tokens per completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; 0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: keep the smallest token set of this "
                                                        "probability mass, in (0, 1]"})
    top_k: int | None = field(default=None, metadata={
        "help": "sample among the k most likely tokens only; null: no limit"})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "penalty on tokens already seen; != 1 is refused with GRPO's algorithm.grpo.rollout_is (the learner "
                "does not score it: docs/sampling.md)"})
    vllm_dtype: str = field(default="auto", metadata={
        "help": "vLLM engines: the engine's dtype; \"float32\" on CPU makes sampler and learner numerics closest"})
    vllm_max_model_len: int = field(default=8192, metadata={
        "help": "vLLM engines: most tokens per sequence (>= data.max_prompt_length + max_completion_length)"})
    vllm_max_images_per_prompt: int = field(default=8, metadata={"help": "vLLM engines: most images in one prompt"})
    vllm_max_videos_per_prompt: int = field(default=1, metadata={"help": "vLLM engines: most videos in one prompt"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "vllm_colocate: the rollout engine's share of each GPU"})
    vllm_sleep_mode: bool = field(default=True, metadata={
        "help": "vllm_colocate on GPU: free the KV cache and weights between rollouts"})
    vllm_tensor_parallel_size: int = field(default=1, metadata={
        "help": "vLLM engines: GPUs one engine's model is split over (tensor parallel)"})
    vllm_data_parallel_size: int = field(default=1, metadata={"help": "vllm_pool servers only: data-parallel replicas"})
    vllm_executor: Literal["auto", "mp"] = field(default="auto", metadata={
        "help": "vLLM's executor: auto = vLLM's choice (one process with one GPU; the learner's process group "
                "under torchrun for the colocated engine); mp = worker processes that get pickled arguments (what "
                "tensor parallel > 1 runs; selectable with 1 so this path is tested on one device)"})
    vllm_max_num_batched_tokens: int | None = field(default=None, metadata={
        "help": "vLLM's scheduler token budget per step (null: vLLM's default, on GPUs 8192-16384); the colocated "
                "engine at a low memory share wants a smaller one (docs/gpu.md)"})
    vllm_max_num_seqs: int | None = field(default=None, metadata={
        "help": "vLLM's scheduler limit of sequences per step (null: vLLM's default, on GPUs 256-1024)"})
    weight_sync_bucket_mb: int = field(default=256, metadata={
        "help": "vLLM engines: parameters are gathered (ZeRO-3) and sent to the engine in buckets this large"})
    weight_sync_lora: Literal["merged", "adapter"] = field(default="merged", metadata={
        "help": "model.lora with vllm_colocate or vllm_pool: merged: every sync sends the full weights with the "
                "adapters merged; adapter: only the adapters are sent and vLLM serves them as a LoRA (no ZeRO-3/FSDP; "
                "vision adapters need vLLM's experimental tower LoRA, Qwen-VL families; vllm_pool: its servers run "
                "with --enable-lora, rollout.pool_servers are checked for it)"})
    pool_servers: list[str] = field(default_factory=list, metadata={
        "help": "vllm_pool: base URLs of running `r1-mm serve rollout`s; empty: the run starts its own"})
    pool_size: int = field(default=2, metadata={
        "help": "vllm_pool: servers the pool starts itself (beside rank 0) when pool_servers is empty"})
    pool_cpu_cores: list[str | int] = field(default_factory=list, metadata={
        "help": "vllm_pool on a CPU machine: the cores of each server the run starts, one entry per server ('1', "
                "'2-3'); the learner processes take the others. The CPU stand-in for servers on GPUs of their own: "
                "without it servers and learners share every core, and overlapping them (max_staleness > 0) slows "
                "both. Empty: no pinning"})
    pool_gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "vllm_pool: servers started by the run take this share of each of their own GPUs"})
    pool_host: str | None = field(default=None, metadata={
        "help": "vllm_pool: where the run's servers listen and are reached; null: 127.0.0.1 on one machine, "
                "machine 0's address (MASTER_ADDR) when the launch spans machines"})
    pool_server_batching: bool = field(default=True, metadata={
        "help": "vllm_pool: servers take concurrent requests (several ranks) into one running batch; false: one "
                "at a time (on CPU sampling then does not depend on which ranks' requests overlap)"})
    pool_on_server_failure: Literal["restart", "fail"] = field(default="restart", metadata={
        "help": "vllm_pool: a server that dies is restarted (needs pool_weight_sync=shm) or stops the run"})
    pool_weight_sync: Literal["auto", "shm", "broadcast"] = field(default="auto", metadata={
        "help": "vllm_pool: how weights reach the servers: shm = safetensors in /dev/shm (same host); broadcast = "
                "a process group (NCCL on GPU, gloo on CPU) with every server worker; auto = shm when every server "
                "is on this host"})
    pool_sync_host: str | None = field(default=None, metadata={
        "help": "vllm_pool broadcast sync: rank 0's address as the servers reach it; null: its address on the "
                "route to them"})
    pool_request_timeout_s: float = field(default=600.0, metadata={
        "help": "vllm_pool: seconds one HTTP request to a server may take"})
    pool_sync_timeout_s: float = field(default=300.0, metadata={
        "help": "vllm_pool broadcast sync: each collective's deadline in seconds (learner and servers); the "
                "learner also stops as soon as a server reports its side failed. Covers the first collective's "
                "NCCL connection set-up and, on servers, the wait while the learner gathers the next ZeRO-3 "
                "bucket"})
    pool_api_key_env: str = field(default="R1MM_ROLLOUT_API_KEY", metadata={
        "help": "vllm_pool: environment variable holding the servers' API key (sent as a bearer token; never put "
                "in argv or logs)"})
    pool_startup_timeout_s: float = field(default=600.0, metadata={
        "help": "vllm_pool: seconds a server may take to become healthy (start or restart)"})
    max_staleness: int = field(default=0, metadata={
        "help": "asynchronous rollouts: the next steps' rollouts are sampled while the learner trains, by weights "
                "at most this many optimizer steps old (vllm_pool: concurrently, on the servers; hf and "
                "vllm_colocate: interleaved, between the learner's updates); the sampler's logprobs are the behaviour "
                "policy of algorithm.grpo.rollout_is. 0: the synchronous loop"})
    partial_rollout_tokens: int | None = field(default=None, metadata={
        "help": "max_staleness > 0: partial rollouts; each step's sampling gives a completion at most this many new "
                "tokens, and one not finished is continued after the next weight update, by the newer weights (each "
                "token's version recorded, its sampler logprob used for the importance weights), until it ends or "
                "reaches max_completion_length; null: off"})
    async_wait_timeout_s: float = field(default=3600.0, metadata={
        "help": "max_staleness > 0: seconds the learner waits for its next rollout batch before it stops the run "
                "(a hung producer fails, it does not hang the run)"})


@dataclass
class RewardSpec:
    """One reward: a registered name, a dotted path ``pkg.mod:fn`` or a file path ``file.py:fn``."""

    name: str = field(default="", metadata={
        "help": "a registered reward name (r1-mm rewards list), pkg.mod:fn or path/to/file.py:fn"})
    weight: float = field(default=1.0, metadata={"help": "the reward's weight in the weighted sum of rewards"})
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "keyword arguments passed to the reward function on every call"})
    completions: Literal["auto", "text", "messages"] = field(default="auto", metadata={
        "help": "how completions reach the function: text, or TRL's conversational "
                "[{\"role\": \"assistant\", \"content\": text}]; auto = messages for TRL's own reward functions "
                "(trl.rewards), text otherwise"})
    isolation: Literal["auto", "process", "inline"] = field(default="auto", metadata={
        "help": "where the function runs: process = a worker process, killed at a time limit; inline = this "
                "process (a limit stops only the wait); auto = process for user code named by path under a time "
                "limit"})


@dataclass
class RewardsConfig:
    """The reward functions and what happens when one fails or hangs."""

    functions: list[RewardSpec] = field(default_factory=list, metadata={
        "help": "the rewards; each a name string or a mapping of the fields below"})
    on_error: Literal["raise", "none"] = field(default="raise", metadata={
        "help": "a raising reward stops the run (raise), or scores None (none)"})
    timeout_s: float | None = field(default=None, metadata={
        "help": "a reward call longer than this many seconds fails (and on_error applies); null: no limit"})
    batch_timeout_s: float | None = field(default=None, metadata={
        "help": "seconds for all of one batch's reward calls together; null: no limit"})


@dataclass
class ToolSpec:
    """One tool: a registered name, a dotted path ``pkg.mod:fn`` or a file path ``file.py:fn``."""

    name: str = field(default="", metadata={
        "help": "a registered tool name (r1-mm tools list), pkg.mod:fn or path/to/file.py:fn"})
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the recipe's fixed keyword arguments of the tool (e.g. crop_image's coordinates)"})


@dataclass
class ToolsConfig:
    """Tools the policy may call mid-reasoning (agentic rollouts), and the limits of a trajectory."""

    functions: list[ToolSpec] = field(default_factory=list, metadata={
        "help": "the tools; each a name string or a mapping of the fields below; empty: single-turn rollouts"})
    call_format: str = field(default="hermes", metadata={
        "help": "how the model writes a call: hermes = <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call> "
                "(the Qwen-VL chat templates)"})
    schemas_in_prompt: bool = field(default=True, metadata={
        "help": "show the tools' schemas to the model (the chat template's tools system turn); false for a model "
                "taught its tools beforehand (SFT), whose prompts then stay as short as without tools"})
    max_turns: int = field(default=3, metadata={
        "help": "model turns per trajectory, the final answer's included"})
    max_tool_calls: int = field(default=2, metadata={"help": "tool calls executed per trajectory"})
    max_total_tokens: int | None = field(default=None, metadata={
        "help": "tokens after the prompt per trajectory, model and tool turns (vision tokens) together; a tool turn "
                "that would pass it ends the trajectory; null: max_turns x rollout.max_completion_length plus the tool "
                "turns"})
    max_images_per_call: int = field(default=4, metadata={
        "help": "images one call may return to the model (a tool's further images are dropped, and counted)"})
    max_pixels_per_image: int = field(default=401408, metadata={
        "help": "a tool image is resized to at most this many pixels (as media.max_pixels does for the prompt's)"})
    max_total_pixels: int = field(default=4014080, metadata={
        "help": "pixels of all tool images of one trajectory together (after max_pixels_per_image); images past it are "
                "not shown, and the call's text says so"})
    call_timeout_s: float = field(default=30.0, metadata={
        "help": "seconds one call may take; a slower one returns an error text to the model"})
    workers: int = field(default=8, metadata={"help": "calls of a batch run concurrently on this many threads"})
    accuracy_reward: str = field(default="accuracy", metadata={
        "help": "the reward (one of rewards.functions) whose score above 0.5 counts an answer as right in the "
                "tools/accuracy_with_call and tools/accuracy_without_call metrics"})


@dataclass
class GRPOConfig:
    """``algorithm.grpo``: GRPO's knobs (names follow TRL's GRPOConfig where both have them): the
    policy loss and its clipping, KL to the reference, advantages, off-policy correction, dynamic
    sampling, and Video-R1's T-GRPO and length control."""

    beta: float = field(default=0.04, metadata={
        "help": "weight of the k3 KL term to the reference; 0 = no KL (and no reference model)"})
    loss_type: str = field(default="dapo", metadata={
        "help": "the policy loss (a registered loss type; TRL's names): grpo, bnpo, dr_grpo, dapo = PPO's clipped "
                "surrogate with per-sequence token means (grpo), batch token mean (bnpo), token sum / "
                "max_completion_length (dr_grpo) or global token mean (dapo); cispo = MiniMax-M1's clipped IS weight "
                "without gradient x A x log pi (token mean); sapo = soft gate sigmoid(tau (r - 1)) 4 / tau instead "
                "of the clip (sapo_temperature_*; per-sequence mean); gmpo = geometric mean of the token ratios "
                "per completion, clipped in log space (epsilon, epsilon_high are log-ratio bounds; the paper uses "
                "0.4; token-level importance sampling only)"})
    epsilon: float = field(default=0.2, metadata={
        "help": "the ratio clip range's lower side (1 - epsilon); cispo: the IS weight's floor 1 - epsilon "
                "(>= 1: none, as MiniMax-M1 trained); gmpo: the log ratio's lower bound -epsilon"})
    epsilon_high: float | None = field(default=None, metadata={
        "help": "the clip range's upper side (1 + epsilon_high, clip-higher); cispo: the IS weight's cap "
                "1 + epsilon_high (TRL's cispo epsilon_high is the cap itself, e.g. ScaleRL's 5.0 is 4.0 here); "
                "gmpo: the log ratio's upper bound; null: epsilon"})
    sapo_temperature_pos: float = field(default=1.0, metadata={
        "help": "sapo: the soft gate's temperature on tokens with a positive advantage (larger: the gradient "
                "decays faster away from ratio 1)"})
    sapo_temperature_neg: float = field(default=1.05, metadata={
        "help": "sapo: the soft gate's temperature on tokens with a non-positive advantage"})
    entropy_coef: float = field(default=0.0, metadata={
        "help": "entropy bonus: the loss minus this x the mean entropy (of the sampling distribution) over the "
                "tokens that get the policy loss, the same for every loss_type (TRL's entropy_coef); 0 turns it off"})
    top_entropy_quantile: float = field(default=1.0, metadata={
        "help": "only the tokens whose entropy is in this top share of the micro-batch's tokens (over all "
                "processes) get the policy loss (\"Beyond the 80/20 Rule\"; TRL's top_entropy_quantile: 0.2 = the "
                "top 20%, 0 = the highest-entropy token, 1 = all); denominators and the KL term keep every token"})
    importance_sampling_level: Literal["token", "sequence"] = field(default="token", metadata={
        "help": "importance ratio per token, or per sequence from the mean token log ratio (GSPO)"})
    kl_importance_weighting: bool = field(default=True, metadata={
        "help": "weight the k3 KL term by the importance ratio pi/pi_old (TRL's use_bias_correction_kl, "
                "its default)"})
    scale_rewards: Literal["group", "batch", "none"] = field(default="group", metadata={
        "help": "advantages are reward - group mean, divided by the group's std, the batch's std, or 1"})
    num_iterations: int = field(default=1, metadata={
        "help": "optimizer updates per sampled batch (> 1: later ones are off-policy, clipped)"})
    mask_truncated_completions: bool = field(default=False, metadata={
        "help": "completions cut at max_completion_length contribute no loss"})
    dynamic_sampling: bool = field(default=False, metadata={
        "help": "replace groups whose rewards all agree by freshly sampled ones (DAPO)"})
    max_resample_rounds: int = field(default=3, metadata={
        "help": "dynamic sampling: resampling rounds per step at most"})
    ref_sync_steps: int | None = field(default=None, metadata={
        "help": "every this many steps the reference moves toward the policy (ref_sync_mix_alpha); "
                "null: a frozen reference"})
    ref_sync_mix_alpha: float = field(default=1.0, metadata={
        "help": "reference sync: ref <- alpha x policy + (1 - alpha) x ref, in (0, 1]"})
    advantage_estimator: str = field(default="grpo", metadata={"help": "a registered advantage estimator"})
    temporal_contrast: bool = field(default=False, metadata={
        "help": "T-GRPO (Video-R1): extra samples on shuffled frames; correct answers earn temporal_bonus only "
                "when ordered frames beat shuffled ones (ordered accuracy >= temporal_margin x shuffled accuracy)"})
    temporal_num_shuffled: int | None = field(default=None, metadata={
        "help": "T-GRPO: completions sampled on shuffled frames; null: G // 2"})
    temporal_bonus: float = field(default=0.3, metadata={"help": "T-GRPO: the bonus a correct answer earns"})
    temporal_margin: float = field(default=0.8, metadata={
        "help": "T-GRPO: the bonus applies when ordered accuracy >= this x shuffled accuracy"})
    temporal_reward: str = field(default="accuracy", metadata={
        "help": "T-GRPO: the reward whose value decides \"correct\""})
    temporal_correct_threshold: float = field(default=0.5, metadata={
        "help": "T-GRPO: a completion is correct when its temporal_reward is >= this"})
    length_bonus: float = field(default=0.0, metadata={
        "help": "Video-R1's length control: when more than one completion of a group is correct "
                "(length_bonus_reward > length_bonus_threshold), the correct ones whose token count lies in "
                "[length_bonus_min_tokens, length_bonus_max_tokens] earn this bonus; 0 turns it off"})
    length_bonus_min_tokens: int = field(default=320, metadata={
        "help": "length control: shortest completion (tokens) that earns the bonus"})
    length_bonus_max_tokens: int = field(default=512, metadata={
        "help": "length control: longest completion (tokens) that earns the bonus"})
    length_bonus_reward: str = field(default="accuracy", metadata={
        "help": "length control: the reward (one of rewards.functions) whose score decides which answers are "
                "correct"})
    length_bonus_threshold: float = field(default=0.1, metadata={
        "help": "length control: a completion is correct when length_bonus_reward is above this"})
    rollout_is: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = field(
        default="token_truncate", metadata={
            "help": "off-policy correction between the rollout engine's sampling logprobs and the learner's "
                    "(TRL's modes): token_/sequence_ x truncate (weights capped at rollout_is_cap) or mask "
                    "(tokens/sequences outside [rollout_is_floor, rollout_is_cap] are dropped); none turns it off"})
    rollout_is_cap: float = field(default=3.0, metadata={
        "help": "rollout_is: the largest importance weight (truncate) or ratio kept (mask)"})
    rollout_is_floor: float | None = field(default=None, metadata={
        "help": "rollout_is mask modes: the smallest ratio kept; null: 0"})
    clip_against: Literal["auto", "learner", "sampler"] = field(default="auto", metadata={
        "help": "the policy the PPO ratio and its epsilon clip are taken against. learner: the learner's own "
                "logprobs at the step's start (verl's decoupled mode; the sampler enters only through rollout_is's "
                "weights, and with num_iterations 1 the clip never acts); sampler: the rollout engine's sampling "
                "logprobs (verl's bypass mode, Tinker's PPO), so the clip bounds how far the policy has moved since "
                "it sampled, which stale samples need (README, asynchronous rollouts); rollout_is then bounds that ratio (truncate: "
                "at rollout_is_cap; mask: tokens outside [floor, cap] dropped), token modes only. auto: sampler "
                "when rollout.max_staleness > 0, else learner"})


@dataclass
class PreferenceConfig:
    """``algorithm.dpo``: the preference loss of dpo, tpo and iterative_dpo (rows, or rounds, of chosen
    and rejected responses), as TRL's DPOTrainer computes it."""

    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = field(default="sigmoid", metadata={
        "help": "preference learning (dpo, tpo, iterative_dpo; rows carry chosen and rejected responses): the "
                "DPO loss, as TRL's DPOTrainer computes it"})
    beta: float = field(default=0.1, metadata={
        "help": "DPO's beta (how far the policy may move from the reference)"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "robust DPO: assumed share of flipped preference labels, in [0, 0.5)"})
    nll_weight: float = field(default=0.0, metadata={
        "help": "weight of the NLL (SFT) term on chosen responses: TPO's and RPO's extra loss"})
    precomputed_reference: bool = field(default=False, metadata={
        "help": "read ref_chosen_logps / ref_rejected_logps columns (r1-mm dpo precompute-ref) instead of a "
                "reference forward"})


@dataclass
class IterativeDPOConfig:
    """``algorithm.iterative_dpo``: the rounds of iterative DPO (LLaVA-OneVision-Chat with LLaVA-Critic)."""

    round_prompts: int = field(default=16, metadata={
        "help": "iterative DPO (LLaVA-OneVision-Chat with LLaVA-Critic): each round samples "
                "rollout.num_generations responses for this many prompts, scores them with rewards.functions "
                "(e.g. critic), pairs best vs worst (ties skipped) and trains one DPO pass over them"})
    reference_from_policy_each_round: bool = field(default=True, metadata={
        "help": "the reference restarts from the policy at each round"})


@dataclass
class SFTConfig:
    """``algorithm.sft``: supervised fine-tuning on the rows' responses (a cold start before GRPO), through the
    same prompts, media and chat template as GRPO, so what SFT teaches is what GRPO sees."""

    response_field: str = field(default="response", metadata={
        "help": "sft: the column holding a row's assistant response (text; the loss covers its tokens and the "
                "end-of-turn token only, never the prompt's)"})
    turns_field: str = field(default="turns", metadata={
        "help": "sft with tools: the column holding a row's model turns (a list of texts; every turn but the last "
                "makes tool calls, which the recipe's tools run, so the tool turns in between are exactly what a "
                "GRPO rollout would see; they are context, not trained on). A row has this or response_field"})


@dataclass
class DistillConfig:
    """``algorithm.distill``: on-policy distillation. The student (``model``) samples
    ``rollout.num_generations`` completions per prompt; a frozen teacher with the same tokenizer scores every
    token the student wrote, media included, and the loss is the per-token divergence of the student's
    next-token distribution to the teacher's (token-mean over the step). A teacher served by vLLM
    (``teacher_engine: vllm``) gives the sampled tokens' logprobs only: the loss is then the sampled-token estimate
    of the reverse KL (``trainers/distill_losses.sampled_reverse_kl``)."""

    teacher: str = field(default="", metadata={
        "help": "distill: the teacher (hub id, local folder or tiny:...); its tokenizer must be the student's (same "
                "vocabulary and ids; its head may have more rows) and its processor must give the same prompt ids"})
    teacher_dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = field(default=None, metadata={
        "help": "dtype the teacher's weights are loaded in (null: model.dtype)"})
    loss: Literal["reverse_kl", "jsd"] = field(default="reverse_kl", metadata={
        "help": "reverse_kl: KL(student || teacher) per token, on the student's samples; jsd: the generalised "
                "Jensen-Shannon divergence of TRL's GKD with beta"})
    beta: float = field(default=0.5, metadata={
        "help": "jsd only: the mixture weight of the teacher in [0, 1] (0: forward KL(teacher || student), 1: "
                "reverse KL)"})
    temperature: float = field(default=1.0, metadata={
        "help": "both models' logits are divided by it before the divergence (the sampling temperature is "
                "rollout.temperature); 1 with a served teacher"})
    teacher_engine: Literal["local", "vllm"] = field(default="local", metadata={
        "help": "local: the teacher is loaded beside the student and scores every token against its full "
                "distribution; vllm: the teacher runs in `r1-mm serve rollout` servers (teacher_servers, or one the "
                "run starts from `teacher`) and returns the logprob of each sampled token only, so the loss is the "
                "sampled-token estimate of the reverse KL (reverse_kl only)"})
    teacher_servers: list[str] = field(default_factory=list, metadata={
        "help": "teacher_engine=vllm: base URLs of running `r1-mm serve rollout --model <teacher>` servers (their "
                "/health's tokenizer must be the student's); empty: the run starts one on its machine from `teacher` "
                "(rollout.vllm_* sizes, teacher_dtype)"})


def teacher_model_config(cfg: RecipeConfig) -> ModelConfig:
    """The distillation teacher, loaded as the student is (attention, trust_remote_code), frozen, in its own dtype."""
    d = cfg.algorithm.distill
    return dataclasses.replace(cfg.model, name_or_path=d.teacher, dtype=d.teacher_dtype or cfg.model.dtype,
                               lora=False, gradient_checkpointing=False, freeze_vision_tower=False)


# keys that lived directly under algorithm: before the sections: where each one is now
MOVED_ALGORITHM_KEYS = {
    "beta": "grpo.beta",
    "loss_type": "grpo.loss_type",
    "epsilon": "grpo.epsilon",
    "epsilon_high": "grpo.epsilon_high",
    "importance_sampling_level": "grpo.importance_sampling_level",
    "kl_importance_weighting": "grpo.kl_importance_weighting",
    "scale_rewards": "grpo.scale_rewards",
    "num_iterations": "grpo.num_iterations",
    "mask_truncated_completions": "grpo.mask_truncated_completions",
    "dynamic_sampling": "grpo.dynamic_sampling",
    "max_resample_rounds": "grpo.max_resample_rounds",
    "ref_sync_steps": "grpo.ref_sync_steps",
    "ref_sync_mix_alpha": "grpo.ref_sync_mix_alpha",
    "advantage_estimator": "grpo.advantage_estimator",
    "temporal_contrast": "grpo.temporal_contrast",
    "temporal_num_shuffled": "grpo.temporal_num_shuffled",
    "temporal_bonus": "grpo.temporal_bonus",
    "temporal_margin": "grpo.temporal_margin",
    "temporal_reward": "grpo.temporal_reward",
    "temporal_correct_threshold": "grpo.temporal_correct_threshold",
    "length_bonus": "grpo.length_bonus",
    "length_bonus_min_tokens": "grpo.length_bonus_min_tokens",
    "length_bonus_max_tokens": "grpo.length_bonus_max_tokens",
    "length_bonus_reward": "grpo.length_bonus_reward",
    "length_bonus_threshold": "grpo.length_bonus_threshold",
    "rollout_is": "grpo.rollout_is",
    "rollout_is_cap": "grpo.rollout_is_cap",
    "rollout_is_floor": "grpo.rollout_is_floor",
    "dpo_loss_type": "dpo.loss_type",
    "dpo_beta": "dpo.beta",
    "label_smoothing": "dpo.label_smoothing",
    "nll_weight": "dpo.nll_weight",
    "precomputed_reference": "dpo.precomputed_reference",
    "round_prompts": "iterative_dpo.round_prompts",
    "reference_from_policy_each_round": "iterative_dpo.reference_from_policy_each_round",
}


@dataclass
class AlgorithmConfig:
    """Which learner runs (``name``, an entry of :mod:`r1_mm.config.algorithms`), and one section of
    settings per algorithm family, each read only by its learner."""

    name: Literal["grpo", "dpo", "tpo", "iterative_dpo", "sft", "distill"] = field(default="grpo", metadata={
        "help": "the learner: grpo (online RL), dpo / tpo (preference pairs), iterative_dpo (sampled pairs per "
                "round), sft (supervised, on the rows' responses), distill (on-policy distillation from a teacher)"})
    grpo: GRPOConfig = field(default_factory=GRPOConfig, metadata={"help": "settings of grpo"})
    dpo: PreferenceConfig = field(default_factory=PreferenceConfig, metadata={
        "help": "settings of the preference loss: dpo, tpo, iterative_dpo"})
    iterative_dpo: IterativeDPOConfig = field(default_factory=IterativeDPOConfig, metadata={
        "help": "settings of iterative_dpo's rounds"})
    sft: SFTConfig = field(default_factory=SFTConfig, metadata={"help": "settings of sft"})
    distill: DistillConfig = field(default_factory=DistillConfig, metadata={"help": "settings of distill"})


@dataclass
class TrainingConfig:
    """The optimisation loop: steps, batch sizes, optimizer, checkpoints, evaluation."""

    output_dir: str = field(default="runs/default", metadata={
        "help": "the run folder (metrics, completions, checkpoints, run_info)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "a fresh run refuses a folder that holds another run's files; true deletes them first"})
    seed: int = field(default=0, metadata={"help": "the run's seed (sampling, data order)"})
    max_steps: int = field(default=10, metadata={
        "help": "steps the run takes: one rollout batch each, trained on algorithm.grpo.num_iterations times"})
    prompts_per_step: int = field(default=2, metadata={
        "help": "prompts per process and optimizer step (rollouts are sampled for all of them at once)"})
    gradient_accumulation_steps: int | None = field(default=None, metadata={
        "help": "micro-batches per optimizer step (default 1): the learner's forward/backward runs in "
                "micro-batches of prompts (with their G completions), the gradients accumulated to exactly the "
                "full step's; set this or micro_batch_size (the other follows)"})
    micro_batch_size: int | None = field(default=None, metadata={
        "help": "prompts per micro-batch (default prompts_per_step); set this or gradient_accumulation_steps"})
    max_tokens_per_micro_batch: int | None = field(default=None, metadata={
        "help": "micro-batches by a token budget instead of a row count: consecutive prompt groups (a prompt with "
                "its G completions; a preference pair) are packed while their learner tokens (prompt with its visual "
                "tokens + the completions, as the forward_mode packs them) stay within this many, so long videos "
                "and short images share a step; a group over the budget gets a micro-batch of its own (logged, "
                "never dropped); gradients still accumulate to exactly the full step's. With several processes "
                "all agree on the largest count (the others split their heaviest micro-batches). null: the fixed "
                "split of gradient_accumulation_steps / micro_batch_size (exclusive with both)"})
    learning_rate: float = field(default=1e-5, metadata={"help": "the optimizer's peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "the optimizer's weight decay"})
    warmup_steps: int = field(default=0, metadata={
        "help": "optimizer steps of learning-rate warm-up (linear and cosine schedules; constant has none)"})
    warmup_ratio: float = field(default=0.0, metadata={
        "help": "warm-up as a fraction of max_steps, used when warmup_steps is 0 (TRL / HF Trainer's name)"})
    lr_scheduler: Literal["constant", "linear", "cosine"] = field(default="constant", metadata={
        "help": "the learning-rate schedule after warm-up (transformers' get_scheduler)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradients are clipped to this global norm"})
    use_cpu: bool = field(default=False, metadata={
        "help": "the launch config (accelerate / DeepSpeed) and the machine decide the device; true forces the "
                "CPU on a machine with GPUs (plain DDP/single process only: DeepSpeed runs where accelerate puts "
                "it)"})
    save_steps: int | None = field(default=None, metadata={
        "help": "save a checkpoint every this many steps (a final one is always saved); null: only the final"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept in the run folder (oldest deleted)"})
    eval_steps: int | None = field(default=None, metadata={
        "help": "score data.eval_path every this many steps (and after the last); null: no evaluation"})
    eval_samples: int = field(default=1, metadata={
        "help": "completions per eval prompt: 1 = greedy; k > 1 = k samples at rollout.temperature"})
    eval_max_rows: int | None = field(default=None, metadata={
        "help": "score only the first this many evaluation rows; null: all"})
    eval_batch_size: int = field(default=8, metadata={"help": "evaluation prompts sampled together"})
    resume_from: str | None = field(default=None, metadata={
        "help": "\"latest\" (this run's newest checkpoint, if any) or a checkpoint folder"})
    max_nonfinite_steps: int = field(default=3, metadata={
        "help": "consecutive non-finite losses before the run saves and stops"})
    forward_mode: Literal["grouped", "naive"] = field(default="grouped", metadata={
        "help": "grouped = prompt and media once per group, completions as varlen sequences (any attention); "
                "naive = G repeated sequences (the library way)"})


@dataclass
class LoggingConfig:
    """Where metrics and completions go."""

    report_to: list[str] = field(default_factory=list, metadata={
        "help": "accelerate's trackers by name (wandb, tensorboard, mlflow, ...) or a plugin file.py:Class"})
    tracker_kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "per tracker, keyword arguments for its start (e.g. {wandb: {tags: [a]}, tensorboard: "
                "{flush_secs: 30}})"})
    project: str = field(default="r1-mm", metadata={"help": "the trackers' project name"})
    run_name: str | None = field(default=None, metadata={"help": "the run's name in the trackers (W&B)"})
    group: str | None = field(default=None, metadata={"help": "W&B group of the run (r1-mm sweep sets it)"})
    logging_steps: int = field(default=1, metadata={
        "help": "write metrics (metrics.jsonl and trackers) every this many steps, and at the last"})
    table_steps: int = field(default=10, metadata={
        "help": "W&B completions table (with images / frames) every this many steps"})
    completions_sample_rate: float = field(default=1.0, metadata={
        "help": "share of each step's groups written to completions.jsonl (1 = every group, 0 = none; for big "
                "runs)"})
    progress_bar: bool = field(default=True, metadata={"help": "show a progress bar on the main process"})


@dataclass
class RecipeConfig:
    """One run: every section of a recipe YAML."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={
        "help": "the policy (and its reference copy) and how it is loaded"})
    data: DataConfig = field(default_factory=DataConfig, metadata={
        "help": "where rows come from and how prompts are built from them"})
    media: MediaConfig = field(default_factory=MediaConfig, metadata={
        "help": "frame and pixel budgets: the same decoded media feed rollout, learner and critic"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "how completions are sampled"})
    rewards: RewardsConfig = field(default_factory=RewardsConfig, metadata={
        "help": "the reward functions and what happens when one fails"})
    tools: ToolsConfig = field(default_factory=ToolsConfig, metadata={
        "help": "tools the policy may call mid-reasoning (agentic rollouts) and a trajectory's limits"})
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig, metadata={
        "help": "policy-optimisation knobs; names follow TRL's GRPOConfig where both have them"})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={
        "help": "the optimisation loop: steps, batch sizes, optimizer, checkpoints, evaluation"})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={
        "help": "where metrics and completions go (trackers, completions.jsonl)"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecipeConfig:
        """A recipe from a dict of sections, checked as a YAML recipe is (types, names, bounds)."""
        return validate(build_dataclass(cls, data))


# --------------------------------------------------------------------------------------------
# Building a typed config from plain data


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
                suggest(str(value), [str(a) for a in args], listing="valid keys") if isinstance(value, str) else ""))
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
        if isinstance(value, str) and tp in (RewardSpec, ToolSpec):
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
            raise ConfigError(f"unknown key '{full}'" + (_misplaced(str(key), cls)
                                                          or suggest(str(key), names, listing="valid keys")))
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _misplaced(key: str, cls: type) -> str:
    """Where an algorithm key belongs when it is given in the wrong place: directly under ``algorithm:``
    (where every key lived before the per-algorithm sections) or in another algorithm's section."""
    sections = {f.name: f.type for f in dataclasses.fields(AlgorithmConfig) if f.name != "name"}
    if cls is AlgorithmConfig and key in MOVED_ALGORITHM_KEYS:
        where = MOVED_ALGORITHM_KEYS[key]
        return f": it belongs under algorithm.{where.split('.')[0]} (algorithm.{where})"
    section_types = typing.get_type_hints(AlgorithmConfig)
    if cls in {section_types[s] for s in sections}:
        for section in sections:
            if key in {f.name for f in dataclasses.fields(section_types[section])}:
                return f": it belongs under algorithm.{section} (algorithm.{section}.{key})"
    return ""


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
    if cfg.rollout.num_generations < 2 and algorithm_spec(cfg.algorithm.name).groups:
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
    grpo = cfg.algorithm.grpo
    # clip-higher's sanity rule; cispo's epsilon is a floor that MiniMax-M1 turns off (>= 1) under a tighter cap
    if grpo.epsilon_high is not None and grpo.epsilon_high < grpo.epsilon and grpo.loss_type != "cispo":
        problems.append("algorithm.grpo.epsilon_high must be >= algorithm.grpo.epsilon")
    if grpo.loss_type == "gmpo" and grpo.importance_sampling_level != "token":
        problems.append("algorithm.grpo.loss_type=gmpo takes its own sequence ratio (the geometric mean of the token "
                        "ratios): algorithm.grpo.importance_sampling_level must be token")
    if cfg.algorithm.grpo.beta < 0:
        problems.append("algorithm.grpo.beta must be >= 0")
    distill = cfg.algorithm.distill
    if cfg.algorithm.name == "distill" and not distill.teacher.strip() and not (
            distill.teacher_engine == "vllm" and distill.teacher_servers):
        problems.append("algorithm.distill.teacher is empty: distill needs a teacher (hub id, folder or tiny:...)")
    if distill.teacher_servers and distill.teacher_engine != "vllm":
        problems.append("algorithm.distill.teacher_servers needs algorithm.distill.teacher_engine=vllm")
    if cfg.algorithm.name == "distill" and distill.teacher_engine == "vllm":
        if distill.loss != "reverse_kl":
            problems.append(f"algorithm.distill.loss={distill.loss} needs the teacher's full distribution at every "
                            "position; a served teacher (teacher_engine=vllm) gives the sampled token's logprob only: "
                            "use loss=reverse_kl or teacher_engine=local")
        if cfg.rollout.temperature <= 0:
            problems.append("a served teacher (algorithm.distill.teacher_engine=vllm) estimates the reverse KL on the "
                            "student's samples: rollout.temperature must be > 0")
        if distill.temperature != 1.0:
            problems.append("algorithm.distill.temperature must be 1 with a served teacher (teacher_engine=vllm): its "
                            "logprobs are the raw model's, at temperature 1")
    if not 0.0 <= distill.beta <= 1.0:
        problems.append("algorithm.distill.beta must be in [0, 1]")
    if distill.temperature <= 0:
        problems.append("algorithm.distill.temperature must be > 0")
    if cfg.data.max_prompt_length < 1:
        problems.append("data.max_prompt_length must be >= 1")
    if cfg.tools.functions and cfg.rollout.engine.startswith("vllm") and cfg.tools.max_total_tokens is not None \
            and cfg.rollout.vllm_max_model_len < cfg.data.max_prompt_length + cfg.tools.max_total_tokens:
        problems.append(f"rollout.vllm_max_model_len ({cfg.rollout.vllm_max_model_len}) is below data.max_prompt_length "
                        f"+ tools.max_total_tokens ({cfg.data.max_prompt_length + cfg.tools.max_total_tokens}): vLLM "
                        "would cut trajectories the recipe allows")
    if cfg.tools.functions and not algorithm_spec(cfg.algorithm.name).runs_tools:
        problems.append(f"tools.functions: tool trajectories are trained by GRPO and SFT only; algorithm.name="
                        f"{cfg.algorithm.name} would never call them")
    if cfg.tools.max_total_tokens is not None and cfg.tools.max_total_tokens < 1:
        problems.append("tools.max_total_tokens must be >= 1 (or null)")
    for name in ("max_turns", "max_tool_calls", "max_images_per_call", "max_pixels_per_image", "max_total_pixels",
                 "workers"):
        if getattr(cfg.tools, name) < 1:
            problems.append(f"tools.{name} must be >= 1")
    if cfg.tools.call_timeout_s <= 0:
        problems.append("tools.call_timeout_s must be > 0")
    if not cfg.training.output_dir.strip():
        problems.append("training.output_dir is empty (the run would write into the working directory); "
                        "give a folder, e.g. training.output_dir=runs/my-run")
    needed = cfg.data.max_prompt_length + cfg.rollout.max_completion_length
    if cfg.rollout.engine.startswith("vllm") and cfg.rollout.vllm_max_model_len < needed:
        problems.append(f"rollout.vllm_max_model_len ({cfg.rollout.vllm_max_model_len}) is below "
                        f"data.max_prompt_length + rollout.max_completion_length ({needed}): vLLM would reject "
                        "the longest prompts the data allows")
    if cfg.model.lora_vision and not cfg.model.lora:
        problems.append("model.lora_vision adds vision adapters to model.lora: set model.lora=true")
    if cfg.rollout.weight_sync_lora == "adapter" and not (cfg.model.lora
                                                          and cfg.rollout.engine in ("vllm_colocate", "vllm_pool")):
        problems.append("rollout.weight_sync_lora=adapter needs model.lora=true and rollout.engine=vllm_colocate or "
                        "vllm_pool (hf takes merged weights)")
    problems += _accumulation_problems(cfg.training)
    problems += _bound_problems(cfg)
    problems += _unscored_sampling_problems(cfg)
    if algorithm_spec(cfg.algorithm.name).samples_while_training and cfg.rollout.temperature == 0:
        problems.append(f"rollout.temperature is 0 (greedy): the {cfg.rollout.num_generations} samples of each prompt "
                        f"would all be the same answer and {cfg.algorithm.name} would learn nothing; use a temperature > 0")
    if cfg.model.attn_implementation.startswith("flash_attention") and cfg.model.dtype == "float32":
        problems.append(f"model.attn_implementation={cfg.model.attn_implementation} needs model.dtype bfloat16 or "
                        "float16 (flash-attention has no float32 kernels); or use attn_implementation=sdpa")
    names = [f.name for f in cfg.rewards.functions]
    problems += _async_problems(cfg)
    problems += _clip_against_problems(cfg)
    problems += _pool_cpu_core_problems(cfg)
    if cfg.algorithm.grpo.length_bonus and cfg.algorithm.grpo.length_bonus_reward not in names:
        problems.append(f"algorithm.grpo.length_bonus_reward {cfg.algorithm.grpo.length_bonus_reward!r} must name one of "
                        f"rewards.functions ({', '.join(names) or 'none'}): its score decides which answers are correct")
    for i, spec in enumerate(cfg.rewards.functions):
        if not spec.name:
            problems.append(f"rewards.functions[{i}].name is empty")
    if problems:
        raise ConfigError("invalid recipe: " + "; ".join(problems))
    return cfg


def clip_against(cfg: RecipeConfig) -> str:
    """``algorithm.grpo.clip_against`` with ``auto`` resolved: the sampler when rollouts may be stale.

    Why the sampler for stale samples: with the learner as the anchor and one update per batch the ratio is 1 and
    the clip never acts, so nothing bounds how far a step moves the policy from the one that sampled; the update
    is right in expectation but the policy's overshoots are corrected one version late. On the counting demo at
    max_staleness 1 that oscillated into a collapse in 3 of 3 seeds where the synchronous loop held, and anchoring
    the clip to the sampler held (README, asynchronous rollouts)."""
    chosen = cfg.algorithm.grpo.clip_against
    if chosen != "auto":
        return chosen
    return "sampler" if cfg.rollout.max_staleness > 0 else "learner"


def _clip_against_problems(cfg: RecipeConfig) -> list[str]:
    if not algorithm_spec(cfg.algorithm.name).reads_sampler_logprobs or clip_against(cfg) != "sampler":
        return []
    mode = cfg.algorithm.grpo.rollout_is
    if mode.startswith("sequence"):
        how = "auto with rollout.max_staleness > 0" if cfg.algorithm.grpo.clip_against == "auto" else "sampler"
        return [f"algorithm.grpo.clip_against={how} takes the ratio against the sampler per token, which "
                f"algorithm.grpo.rollout_is={mode}'s sequence weights would count a second time: use a token_ mode, or "
                "clip_against: learner"]
    return []


def _pool_cpu_core_problems(cfg: RecipeConfig) -> list[str]:
    """rollout.pool_cpu_cores as a recipe: for servers the run starts, one entry each, each a core list (the
    machine's own cores are checked by preflight)."""
    r = cfg.rollout
    if not r.pool_cpu_cores:
        return []
    if r.engine != "vllm_pool" or r.pool_servers:
        return ["rollout.pool_cpu_cores pins the servers a vllm_pool run starts itself: it needs rollout.engine="
                "vllm_pool and no rollout.pool_servers"]
    if len(r.pool_cpu_cores) != r.pool_size:
        return [f"rollout.pool_cpu_cores has {len(r.pool_cpu_cores)} entr{'y' if len(r.pool_cpu_cores) == 1 else 'ies'} "
                f"for rollout.pool_size={r.pool_size} servers: give one core list per server"]
    return cpu_cores.layout_problems(r.pool_cpu_cores)


def _async_problems(cfg: RecipeConfig) -> list[str]:
    """Asynchronous rollouts (``rollout.max_staleness`` > 0): what they need to stay correct off-policy."""
    k = cfg.rollout.max_staleness
    if k == 0:
        return ([] if cfg.rollout.partial_rollout_tokens is None else
                ["rollout.partial_rollout_tokens needs rollout.max_staleness >= 1 (a continued completion is sampled "
                 "by two versions)"])
    if k < 0:
        return ["rollout.max_staleness must be >= 0"]
    if cfg.rollout.async_wait_timeout_s <= 0:
        return ["rollout.async_wait_timeout_s must be > 0"]
    if not algorithm_spec(cfg.algorithm.name).reads_sampler_logprobs:
        return [f"rollout.max_staleness={k}: algorithm {cfg.algorithm.name} does not correct by the sampler's logprobs, "
                "so it cannot train on rollouts of older weights (asynchronous rollouts are GRPO's)"]
    partial = cfg.rollout.partial_rollout_tokens
    if partial is not None:
        if not 1 <= partial < cfg.rollout.max_completion_length:
            return [f"rollout.partial_rollout_tokens ({partial}) must be in [1, rollout.max_completion_length) "
                    f"([1, {cfg.rollout.max_completion_length}))"]
        if cfg.algorithm.grpo.dynamic_sampling or cfg.tools.functions:
            return ["rollout.partial_rollout_tokens: not with algorithm.grpo.dynamic_sampling or tools.functions "
                    "(their extra prompts and tool turns would be continued across versions untested)"]
    if cfg.algorithm.grpo.rollout_is == "none":
        return [f"rollout.max_staleness={k} needs algorithm.grpo.rollout_is (e.g. token_truncate): samples up to {k} "
                "versions old are corrected by the sampler's logprobs as the behaviour policy, none would train them "
                "as on-policy"]
    return []


# rollout settings that change the logprobs the engines report (vLLM's processed_logprobs are taken after
# its penalties; the hf engine records them after transformers' own processors) but that the learner's
# scoring does not reproduce (docs/sampling.md), with the value at which they do nothing
UNSCORED_SAMPLING = {"repetition_penalty": 1.0}


def _unscored_sampling_problems(cfg: RecipeConfig) -> list[str]:
    """Refuse a sampling setting the learner does not score when the sampler's logprobs are used.

    Why: GRPO's ``algorithm.grpo.rollout_is`` weights each token by exp(learner - sampler). A repetition
    penalty moves the sampler's distribution per position by the tokens seen so far (prompt included,
    with engine-specific prompt ids), so that ratio is not 1 even at identical weights and the
    correction would reweight every token by the penalty, not by off-policy drift. Nothing else reads
    the sampler's logprobs (DPO variants, ``rollout_is: none``), so the setting stays allowed there."""
    if not algorithm_spec(cfg.algorithm.name).reads_sampler_logprobs or (
            cfg.algorithm.grpo.rollout_is == "none" and clip_against(cfg) == "learner"):
        return []
    return [f"rollout.{name}={getattr(cfg.rollout, name)} changes the rollout engines' logprobs in a way the learner "
            f"does not reproduce, so algorithm.grpo.rollout_is={cfg.algorithm.grpo.rollout_is} would reweight tokens by a ratio "
            f"that is not 1 at identical weights: set rollout.{name}={neutral:g} or algorithm.grpo.rollout_is=none"
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
    ("algorithm.grpo.epsilon", 0, False, None, False),
    ("algorithm.grpo.num_iterations", 1, True, None, False),
    ("algorithm.grpo.max_resample_rounds", 0, True, None, False),
    ("algorithm.grpo.ref_sync_steps", 1, True, None, False),
    ("algorithm.grpo.ref_sync_mix_alpha", 0, False, 1, True),
    ("algorithm.grpo.rollout_is_cap", 0, False, None, False),
    ("algorithm.grpo.sapo_temperature_pos", 0, False, None, False),
    ("algorithm.grpo.sapo_temperature_neg", 0, False, None, False),
    ("algorithm.grpo.top_entropy_quantile", 0, True, 1, True),
    ("algorithm.dpo.beta", 0, False, None, False),
    ("algorithm.dpo.label_smoothing", 0, True, 0.5, False),
    ("algorithm.dpo.nll_weight", 0, True, None, False),
    ("algorithm.iterative_dpo.round_prompts", 1, True, None, False),
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
    ("algorithm.grpo.temporal_num_shuffled", 1, True, None, False),
    ("algorithm.grpo.rollout_is_floor", 0, True, None, False),
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

    def visit(obj: Any, path: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):  # a section inside a section (algorithm.grpo)
                visit(value, f"{path}.{f.name}")
            elif isinstance(value, float) and not math.isfinite(value):
                found.append(f"{path}.{f.name} must be a finite number, got {value!r}")

    for section in dataclasses.fields(cfg):
        visit(getattr(cfg, section.name), section.name)
    for i, spec in enumerate(cfg.rewards.functions):
        if not math.isfinite(spec.weight):
            found.append(f"rewards.functions[{i}].weight must be a finite number, got {spec.weight!r}")
    return found


def _bound_problems(cfg: RecipeConfig) -> list[str]:
    found = _finite_problems(cfg)
    for path, low, low_in, high, high_in in _BOUNDS:
        value: Any = cfg
        for part in path.split("."):
            value = getattr(value, part)
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
    if t.max_tokens_per_micro_batch is not None:
        if t.max_tokens_per_micro_batch < 1:
            return ["training.max_tokens_per_micro_batch must be >= 1"]
        if steps is not None or micro is not None:
            return ["training.max_tokens_per_micro_batch forms the micro-batches by tokens: leave "
                    "training.gradient_accumulation_steps and training.micro_batch_size unset (null)"]
    if steps is not None and micro is not None and steps * micro != t.prompts_per_step:
        return [f"training.gradient_accumulation_steps ({steps}) x training.micro_batch_size ({micro}) must equal "
                f"training.prompts_per_step ({t.prompts_per_step}); set only one of the two"]
    divisor = steps if steps is not None else micro
    if divisor is not None and t.prompts_per_step % divisor:
        name = "gradient_accumulation_steps" if steps is not None else "micro_batch_size"
        return [f"training.{name} ({divisor}) must divide training.prompts_per_step ({t.prompts_per_step})"]
    return []


def accumulation(t: TrainingConfig) -> tuple[int, int]:
    """(gradient_accumulation_steps, micro_batch_size) of a validated training section.

    With ``max_tokens_per_micro_batch`` the count changes from step to step (trainers/backend.py sets it per
    step); this returns its bound, ``(prompts_per_step, 1)``: at most one micro-batch per prompt, the
    nominal values the back-ends are configured with (DeepSpeed's accumulation steps and batch size)."""
    if t.max_tokens_per_micro_batch is not None:
        return t.prompts_per_step, 1
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
