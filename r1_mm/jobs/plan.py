"""``r1-mm plan RECIPE --gpus N``: how much memory one learner process needs, before renting GPUs.

Why a model of our own: the question "does this 7B video recipe fit on 8 x 80 GB?" has to be answered
from the recipe alone. The parameter counts are exact (the model is instantiated on the meta device
from its config.json: no weights are read or allocated); the rest follows the learner's own
algorithm, so each line names the code it models:

- weights of the policy and of the reference (``backend.build_learner``), sharded under ZeRO-3; a
  distillation teacher's (``trainers.distill``: its own config.json and dtype), sharded the same way;
- gradients (sharded from ZeRO-2) and AdamW's two states per trainable parameter (sharded from ZeRO-1),
  plus DeepSpeed's float32 master copy, in the bytes the launch's mixed precision really allocates
  (``learner_precision``: ``--launch`` is read as accelerate reads it), and the two parameter-sized
  temporaries of torch's foreach AdamW step;
- the activations kept for backward of ONE micro-batch of the grouped forward: every prompt once and
  its G completions (``grouped_forward.pack_groups``), per decoder layer the tensors a Qwen2-style
  layer saves, the prompt keys/values the packed attention gathers per completion, the vision
  tower's patches (none when it is frozen); with gradient checkpointing, each layer's input only,
  plus one layer recomputed at a time;
- the tiled LM head (``token_scores``): its tiles and its float32 gradient accumulator for the head;
- the runtime: on the CPU, measured at plan time in a fresh process that imports what the learner
  imports and loads the recipe's processor (a constant went stale: processors pull in mistral_common
  and OpenCV, TRL pulls in vLLM, ~300 MiB more than when it was measured); on a GPU, a CUDA context;
- a colocated vLLM engine's reservation on a GPU (``rollout.vllm_gpu_memory_utilization``).

The estimate is the worst case the recipe allows (``data.max_prompt_length`` prompt tokens, every
completion ``rollout.max_completion_length`` long). ``tests/test_planning.py`` checks it against the
peak RSS of real CPU runs (tiny and real-vocabulary models) to within 30%.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from r1_mm.config.algorithms import algorithm_spec
from r1_mm.config.recipe import RecipeConfig, accumulation
from r1_mm.config.visual_budget import PLAN_FACTOR, video_token_budget

GIB = 2**30
# Used only when the runtime cannot be measured (see measure_cpu_runtime); measured here on 2026-12-02.
CPU_RUNTIME_FALLBACK_BYTES = 1050 * 2**20
CUDA_RUNTIME_BYTES = 1 * GIB
# What a learner process has loaded before its first model: the trainers (torch, transformers, accelerate,
# DeepSpeed), TRL (which imports vLLM when installed) and the recipe's processor with its tokenizer stack.
_RUNTIME_PROBE = """
import sys
from r1_mm.config.recipe import load_recipe
from r1_mm.core.memory import peak_rss_bytes
import r1_mm.trainers, trl  # noqa: F401
from r1_mm.models.loading import load_processor
load_processor(load_recipe(None, [f"model.name_or_path={sys.argv[1]}", f"model.trust_remote_code={sys.argv[2]}"]).model)
print(peak_rss_bytes())
"""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
HEAD_TILE_BYTES = 2 * 4096 * 4096 * 4  # token_scores: a float32 logits tile and its gradient tile
# TRL's ChunkedDivergenceFunction: a float32 student tile and a teacher tile of TOKEN_CHUNK_SIZE x VOCAB_CHUNK_SIZE
DIVERGENCE_TILE_BYTES = 2 * 4096 * 32768 * 4


@dataclass
class Line:
    name: str
    bytes: float
    note: str


@dataclass
class MemoryPlan:
    recipe: str
    gpus: int
    zero_stage: int
    device: str
    lines: list[Line] = field(default_factory=list)
    sharding: str = ""  # "FSDP2" for an FSDP2 launch; empty: the ZeRO stage says it
    video: str = ""  # the largest video's frames x tokens per frame, as the loader budgets it
    compute: str = ""  # active parameters per token (what compute scales with; all of a dense model's)

    @property
    def total_bytes(self) -> float:
        return sum(line.bytes for line in self.lines)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "total_bytes": self.total_bytes}, indent=1)

    def table(self) -> str:
        sharding = self.sharding or f"ZeRO stage {self.zero_stage}"
        rows = [f"memory per learner process: {self.recipe}, {self.gpus} process(es), {sharding}, "
                f"{self.device}", *([f"visual tokens: {self.video}"] if self.video else []),
                *([f"compute: {self.compute}"] if self.compute else []), "",
                "| part | GiB | how |", "|---|---|---|"]
        rows += [f"| {line.name} | {line.bytes / GIB:.2f} | {line.note} |" for line in self.lines]
        rows.append(f"| **total** | **{self.total_bytes / GIB:.2f}** | |")
        return "\n".join(rows)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model: exact parameter counts and the layer sizes.

    Mixture-of-experts models: memory holds every expert (``total_params``), while each token runs
    through the router's ``top_k`` of them (``active_params``, what compute scales with), and a layer
    keeps for backward the inputs of those ``top_k`` experts (``intermediate`` is their summed width)."""

    total_params: int
    vision_params: int
    lora_params: int
    text_layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    tied_head: bool
    active_params: int = 0  # 0: every parameter is active (a dense model)
    pixels_per_token_side: int = PLAN_FACTOR  # the vision tower's patch x spatial merge (Qwen3-VL: 16 x 2)

    @property
    def active(self) -> int:
        return self.active_params or self.total_params


def expert_counts(model: Any, text: Any) -> tuple[int, int]:
    """(parameters of the routed experts, of them active per token) of a model on the meta device:
    every parameter under an ``experts`` module (fused 3-D tensors or one module per expert), scaled by
    top_k / experts. (0, 0) for a dense model."""
    experts, top_k = getattr(text, "num_experts", 0) or 0, getattr(text, "num_experts_per_tok", 0) or 0
    if not experts or not top_k:
        return 0, 0
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in f".{name}")
    return routed, routed * top_k // experts


def model_shape(cfg: RecipeConfig) -> ModelShape:
    """Counts from the model's config.json, instantiated on the meta device (no weights read or allocated)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from r1_mm.models.hub import read_model_config
    from r1_mm.models.loading import vision_modules

    config = read_model_config(cfg.model)  # a ConfigError in one line when the model cannot be reached
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    towers = vision_modules(model)
    vision_params = sum(p.numel() for t in towers for p in t.parameters())
    lora = 0
    if cfg.model.lora:
        tower_ids = {id(m) for t in towers for m in t.modules()}
        for name, module in model.named_modules():
            if (isinstance(module, torch.nn.Linear) and name.split(".")[-1] in cfg.model.lora_target_modules
                    and id(module) not in tower_ids):
                lora += cfg.model.lora_r * (module.in_features + module.out_features)
    text = config.get_text_config()
    vision = getattr(config, "vision_config", None)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    routed, active_routed = expert_counts(model, text)
    total = sum(p.numel() for p in model.parameters())
    # per token, a sparse layer runs top_k experts of moe_intermediate_size (plus a shared expert, if any)
    # (an all-sparse decoder such as Qwen3.5-MoE declares no dense intermediate_size)
    intermediate = getattr(text, "intermediate_size", 0) or 0
    if routed and getattr(text, "moe_intermediate_size", None):
        intermediate = text.num_experts_per_tok * text.moe_intermediate_size + (
            getattr(text, "shared_expert_intermediate_size", 0) or 0)
    side = PLAN_FACTOR
    if vision is not None and getattr(vision, "patch_size", None) and getattr(vision, "spatial_merge_size", None):
        side = vision.patch_size * vision.spatial_merge_size
    # Qwen2-VL names the tower's width embed_dim (its hidden_size is the projector's output)
    vision_hidden = (getattr(vision, "embed_dim", None) or getattr(vision, "hidden_size", 0)) if vision else 0
    return ModelShape(
        total_params=total, vision_params=vision_params, lora_params=lora,
        text_layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=intermediate,
        kv_dim=getattr(text, "num_key_value_heads", text.num_attention_heads) * head_dim, vocab=text.vocab_size,
        vision_layers=(getattr(vision, "depth", None) or getattr(vision, "num_hidden_layers", 0)) if vision else 0,
        vision_hidden=vision_hidden,
        vision_intermediate=(getattr(vision, "intermediate_size", None) or 4 * vision_hidden) if vision else 0,
        tied_head=bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)),
        active_params=total - routed + active_routed if routed else 0, pixels_per_token_side=side)


def visual_tokens_per_prompt(cfg: RecipeConfig, side: int = PLAN_FACTOR) -> int:
    """The most visual tokens one prompt can hold: one image or one video at the media budgets (``side`` x
    ``side`` pixels per token: 28 for Qwen2/2.5-VL, 32 for Qwen3-VL; the video as the loader budgets it,
    ``visual_budget.video_token_budget``), never more than the prompt length allows."""
    per_image = cfg.media.max_pixels // (side * side)
    return min(max(per_image, video_token_budget(cfg.media, factor=side).total), cfg.data.max_prompt_length)


def launch_zero_stage(launch_config: str | Path | None) -> tuple[int, bool]:
    """(ZeRO stage, bf16 mixed precision) of an accelerate launch config; (0, False) for none.

    As accelerate resolves it: the YAML's ``mixed_precision`` becomes ACCELERATE_MIXED_PRECISION, which
    ``DeepSpeedPlugin.set_mixed_precision`` writes into the DeepSpeed config as ``bf16.enabled`` (filling
    only "auto" or absent values: a DeepSpeed JSON's explicit ``bf16.enabled`` wins)."""
    if launch_config is None:
        return 0, False
    import yaml

    data = yaml.safe_load(Path(launch_config).read_text()) or {}
    bf16 = str(data.get("mixed_precision", "no")) == "bf16"
    if data.get("distributed_type") != "DEEPSPEED":
        return 0, bf16
    ds = data.get("deepspeed_config") or {}
    if ds.get("deepspeed_config_file"):
        ds_json = json.loads(Path(ds["deepspeed_config_file"]).read_text())
        enabled = str(ds_json.get("bf16", {}).get("enabled", "auto")).lower()
        return int(ds_json.get("zero_optimization", {}).get("stage", 0)), bf16 if enabled == "auto" else enabled == "true"
    return int(ds.get("zero_stage", 0)), bf16


def launch_fsdp_version(launch_config: str | Path | None) -> int | None:
    """The FSDP version of an accelerate launch config (``fsdp_config.fsdp_version``, accelerate's default 1);
    None when the launch is not FSDP."""
    if launch_config is None:
        return None
    import yaml

    data = yaml.safe_load(Path(launch_config).read_text()) or {}
    if data.get("distributed_type") != "FSDP":
        return None
    return int((data.get("fsdp_config") or {}).get("fsdp_version", 1))


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter that the learner really allocates under a launch (what each line multiplies)."""

    weights: int
    gradients: int
    optimizer: int  # AdamW's two states, plus DeepSpeed's float32 master copy when it keeps one
    step_temporaries: int  # per temporary of the AdamW step (it updates the master copy when there is one)
    note: str


def learner_precision(dtype: str, zero_stage: int, mixed_bf16: bool) -> Precision:
    """What the model dtype and the launch's mixed precision allocate, read from the libraries' code:

    - no ZeRO (DDP, one process): torch's AdamW on the parameters as loaded; bf16 mixed precision is an
      autocast and changes no parameter, gradient or state;
    - ZeRO with bf16 mixed precision: DeepSpeed casts the module to bf16
      (``DeepSpeedEngine._configure_distributed_model``), accumulates gradients in bf16
      (``get_data_types``) and updates a float32 master copy with float32 AdamW states;
    - ZeRO with mixed precision 'no': the module keeps the recipe's dtype, gradients accumulate in float32
      (the engine's model dtype) and the float32 master copy is still made (ZeRO-1/2 always clone it;
      ZeRO-3 shares it only when the parameters already are float32).
    """
    b = DTYPE_BYTES[dtype]
    if zero_stage == 0:
        return Precision(b, b, 2 * b, b, f"{2 * b} bytes: 2 AdamW states in the parameters' dtype")
    if mixed_bf16:
        return Precision(2, 2, 12, 4, "12 bytes: float32 master + 2 AdamW states (DeepSpeed bf16)")
    master = 0 if b == 4 and zero_stage == 3 else 4
    return Precision(b, 4, 8 + master, 4, f"{8 + master} bytes: "
                     + ("float32 master + " if master else "") + "2 float32 AdamW states (DeepSpeed, no mixed precision)")


def fsdp2_precision(dtype: str, mixed_bf16: bool) -> Precision:
    """FSDP2 through accelerate (``fsdp2_prepare_model``): with bf16 mixed precision the trainable parameters
    are upcast to float32 (those sharded float32 weights are the master copy: no other), computed in bf16
    (``MixedPrecisionPolicy(param_dtype=bf16)``), their sharded gradients float32, AdamW's two states float32;
    with mixed precision 'no' everything stays in the recipe's dtype (r1-mm refuses a bf16 model there: no
    master weights). ``weights`` here is the trainable parameters' bytes; frozen ones keep the recipe's dtype."""
    b = DTYPE_BYTES[dtype]
    if mixed_bf16:
        return Precision(4, 4, 8, 4, "8 bytes: 2 float32 AdamW states (FSDP2 bf16: the float32 sharded weights are the master)")
    return Precision(b, b, 2 * b, b, f"{2 * b} bytes: 2 AdamW states in the parameters' dtype (FSDP2)")


def measure_cpu_runtime(cfg: RecipeConfig) -> tuple[int, str]:
    """The learner's runtime on this machine and its libraries, with a note saying how it was found."""
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", _RUNTIME_PROBE, cfg.model.name_or_path, str(cfg.model.trust_remote_code)],
                           capture_output=True, text=True, timeout=600)
    lines = probe.stdout.strip().splitlines()
    if probe.returncode == 0 and lines and lines[-1].isdigit():
        return int(lines[-1]), "the process after the learner's imports and processor (measured now, on this machine)"
    return CPU_RUNTIME_FALLBACK_BYTES, "the process after imports (could not measure here; a value measured on a CPU machine)"


def plan(cfg: RecipeConfig, *, gpus: int, zero_stage: int, mixed_bf16: bool = False, device: str = "gpu",
         gpu_memory_gib: float = 80.0, recipe: str = "", shape: ModelShape | None = None,
         cpu_runtime: tuple[int, str] | None = None, fsdp2: bool = False) -> MemoryPlan:
    """cpu_runtime: (bytes, note) of the runtime for device="cpu"; measured when not given. ``fsdp2``: an FSDP2
    launch (``zero_stage`` is then ignored): parameters, gradients and optimizer states sharded like ZeRO-3,
    plus the units FSDP2 holds gathered while it computes."""
    shape = shape or model_shape(cfg)
    if fsdp2:
        zero_stage = 3  # what is sharded: everything, over all processes
        precision = fsdp2_precision(cfg.model.dtype, mixed_bf16)
    else:
        precision = learner_precision(cfg.model.dtype, zero_stage, mixed_bf16)
    b = DTYPE_BYTES[cfg.model.dtype] if fsdp2 else precision.weights  # frozen weights, the reference
    out = MemoryPlan(recipe=recipe, gpus=gpus, zero_stage=0 if fsdp2 else zero_stage, device=device,
                     sharding="FSDP2" if fsdp2 else "")
    add = lambda name, value, note: out.lines.append(Line(name, float(value), note))  # noqa: E731
    shard3 = gpus if zero_stage >= 3 else 1
    a = cfg.algorithm
    spec = algorithm_spec(a.name)
    preference = spec.preference_loss
    g = 2 if preference else 1 if spec.responses_in_rows else cfg.rollout.num_generations  # SFT: the row's response

    trainable = shape.lora_params if cfg.model.lora else shape.total_params - (
        shape.vision_params if cfg.model.freeze_vision_tower else 0)
    if fsdp2:
        frozen = shape.total_params - trainable
        add("policy weights", (trainable * precision.weights + frozen * b) / shard3,
            f"{trainable / 1e9:.3f} B trainable x {precision.weights} bytes"
            + (f" + {frozen / 1e9:.3f} B frozen x {b} bytes" if frozen else "") + (", sharded" if shard3 > 1 else ""))
    else:
        add("policy weights", (shape.total_params + shape.lora_params) * b / shard3,
            f"{shape.total_params / 1e9:.3f} B parameters x {b} bytes" + (", sharded" if shard3 > 1 else "")
            + (f" (mixture of experts: every expert held; {shape.active / 1e9:.3f} B active per token)"
               if shape.active_params else ""))
    # GRPO's KL term (grpo.beta) needs one; SFT and distillation never load a reference
    needs_reference = (not a.dpo.precomputed_reference) if preference else (
        algorithm_spec(a.name).policy_losses and a.grpo.beta != 0.0)
    if needs_reference and not cfg.model.lora:  # LoRA: the adapter-disabled policy is the reference
        add("reference weights", shape.total_params * b / shard3, "frozen copy" + (", sharded" if shard3 > 1 else ""))
    teacher = None
    # trainers/distill.py: frozen, in its own dtype, sharded as the reference is (a served teacher: in its servers)
    if a.name == "distill" and a.distill.teacher_engine == "local":
        import dataclasses

        teacher = model_shape(dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, name_or_path=a.distill.teacher, dtype=a.distill.teacher_dtype or cfg.model.dtype, lora=False)))
        tb = DTYPE_BYTES[a.distill.teacher_dtype or cfg.model.dtype]
        add("teacher weights", teacher.total_params * tb / shard3,
            f"{teacher.total_params / 1e9:.3f} B parameters x {tb} bytes, frozen" + (", sharded" if shard3 > 1 else ""))
    add("gradients", trainable * precision.gradients / (gpus if zero_stage >= 2 else 1),
        f"{trainable / 1e9:.3f} B trainable x {precision.gradients} bytes" + (", sharded" if zero_stage >= 2 else ""))
    add("optimizer states", precision.optimizer * trainable / (gpus if zero_stage >= 1 else 1),
        precision.note + (", sharded" if zero_stage >= 1 else ""))

    # torch's AdamW (foreach, the default on CPU and CUDA; DeepSpeed wraps it on each shard) builds
    # temporaries the size of the parameters it updates, e.g. sqrt(v) and the step (measured on the CPU:
    # +230 MiB transient at 20 M trainable float32 parameters, the run's peak)
    add("optimizer step temporaries", 2 * precision.step_temporaries * trainable / (gpus if zero_stage >= 1 else 1),
        "foreach AdamW: two parameter-sized temporaries during step()")
    if fsdp2 and gpus > 1:
        compute = 2 if mixed_bf16 else b
        layer = max(0, shape.total_params - shape.vision_params - 2 * shape.vocab * shape.hidden) // max(1, shape.text_layers)
        add("FSDP2 gathered units", (2 * shape.vocab * shape.hidden + 2 * layer) * compute,
            f"embeddings and head (one unit, kept gathered through forward and backward) and two decoder layers "
            f"(the one computing, the one prefetched), full size x {compute} bytes")
    _, micro = accumulation(cfg.training)
    prompt, completion = cfg.data.max_prompt_length, cfg.rollout.max_completion_length
    if cfg.tools.functions:  # a tool trajectory: model turns and tool turns, up to its whole budget
        completion = cfg.tools.max_total_tokens or cfg.tools.max_turns * completion
    packed = prompt + g * completion if cfg.training.forward_mode == "grouped" else g * (prompt + completion)
    if cfg.training.max_tokens_per_micro_batch is not None:  # as many worst-case groups as the budget holds (one at least)
        micro = max(1, min(cfg.training.prompts_per_step, cfg.training.max_tokens_per_micro_batch // packed))
    tokens = micro * packed
    h, i, kv, layers = shape.hidden, shape.intermediate, shape.kv_dim, shape.text_layers
    per_token_layer = (6 * h + 2 * kv + 4 * i) * b  # norms, q/k/v, attention output, MLP gate/up/act/down inputs
    gathered_kv = micro * ((g + 1) * prompt + g * completion) * 2 * kv * b if cfg.training.forward_mode == "grouped" else 0
    if cfg.model.gradient_checkpointing:
        text_acts = tokens * h * b * layers + tokens * per_token_layer + gathered_kv
        how = "checkpointed: each layer's input, one layer recomputed at a time"
    else:
        text_acts = tokens * per_token_layer * layers + gathered_kv * layers
        how = f"{layers} layers kept for backward"
    add("activations: language model", text_acts, f"{tokens} tokens per micro-batch ({micro} prompt(s), G={g}); {how}")
    side = shape.pixels_per_token_side
    video = video_token_budget(cfg.media, factor=side)
    out.video = f"{video.describe()} at most per video (media budget, {side}x{side} pixels per token)"
    out.compute = (f"{shape.active / 1e9:.3f} B parameters active per token"
                   + (f" of {shape.total_params / 1e9:.3f} B (mixture of experts)" if shape.active_params else "")
                   + f": ~{6 * shape.active / 1e9:.1f} GFLOP per trained token (6 x active, forward and backward)")
    patches = micro * visual_tokens_per_prompt(cfg, side) * 4  # 2x2 patches merge into one token
    if shape.vision_layers and not cfg.model.freeze_vision_tower and not cfg.model.lora:
        vision_per = (6 * shape.vision_hidden + 2 * shape.vision_intermediate) * b
        vision_acts = patches * vision_per * (1 if cfg.model.gradient_checkpointing else shape.vision_layers)
        add("activations: vision tower", vision_acts, f"{patches} patches per micro-batch")
    scored = micro * g * completion
    head = HEAD_TILE_BYTES + 2 * scored * h * 4 + (shape.vocab * h * 4 if trainable and not cfg.model.lora else 0)
    add("LM head (tiled)", head, f"{scored} scored tokens, tiles of 4096 x 4096; float32 head gradient")
    if teacher is not None:  # the teacher's hidden states at the scored positions, and the two-head tiles
        add("distillation divergence (tiled)", scored * teacher.hidden * 4 + DIVERGENCE_TILE_BYTES,
            f"{scored} scored tokens: the teacher's last hidden states, float32 tiles of 4096 x 32768 for both heads")
    if device == "cpu":
        add("runtime", *(cpu_runtime or measure_cpu_runtime(cfg)))
    else:
        add("runtime", CUDA_RUNTIME_BYTES, "CUDA context and allocator reserve")
        if cfg.rollout.engine == "vllm_colocate":
            add("vLLM (colocated, while sampling)", cfg.rollout.vllm_gpu_memory_utilization * gpu_memory_gib * GIB,
                f"rollout.vllm_gpu_memory_utilization x {gpu_memory_gib:g} GiB; released between rollouts with sleep mode")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from r1_mm.config.doc import OVERRIDES_EPILOG
    from r1_mm.config.recipe import ConfigError
    from r1_mm.jobs.train import resolve

    p = argparse.ArgumentParser(prog="r1-mm plan", description="Estimate the memory one learner process needs.",
                                epilog=OVERRIDES_EPILOG)
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="section.field=value recipe overrides")
    p.add_argument("--gpus", type=int, default=1, help="learner processes the launch starts (one per GPU)")
    p.add_argument("--launch", help="accelerate launch config (its ZeRO stage and mixed precision are used)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="instead of --launch")
    p.add_argument("--fsdp2", action="store_true", help="instead of --launch: an FSDP2 launch (--bf16 for its mixed precision)")
    p.add_argument("--bf16", action="store_true", help="with --fsdp2 or --zero-stage: bf16 mixed precision")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (for a colocated vLLM's share)")
    p.add_argument("--cpu", action="store_true", help="estimate a CPU run (no CUDA context, no vLLM reservation)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_intermixed_args(argv)  # overrides before or after the options
    try:
        cfg, _ = resolve([args.recipe, *args.overrides], prog="r1-mm plan")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stage, bf16 = launch_zero_stage(args.launch)
    fsdp_version = launch_fsdp_version(args.launch)
    if fsdp_version not in (None, 2):
        print(f"error: the launch config runs FSDP version {fsdp_version}; r1-mm supports FSDP2 only "
              "(fsdp_config: {fsdp_version: 2}, as recipes/accelerate/fsdp2.yaml)", file=sys.stderr)
        return 2
    fsdp2 = fsdp_version == 2 or args.fsdp2
    if args.zero_stage is not None:
        stage = args.zero_stage
    if args.launch is None and args.bf16:
        bf16 = True
    import contextlib

    try:
        with contextlib.redirect_stdout(sys.stderr):  # libraries imported on the way log to stdout (DeepSpeed)
            result = plan(cfg, gpus=args.gpus, zero_stage=stage, mixed_bf16=bf16, device="cpu" if args.cpu else "gpu",
                          gpu_memory_gib=args.gpu_memory, recipe=Path(args.recipe).name, fsdp2=fsdp2)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.to_json() if args.json else result.table())
    if not args.cpu and not args.json and result.total_bytes > args.gpu_memory * GIB:
        print(f"\ndoes not fit: {result.total_bytes / GIB:.1f} GiB > {args.gpu_memory:g} GiB per GPU")
    return 0
