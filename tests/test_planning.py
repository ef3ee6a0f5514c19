"""`r1-mm plan`: exact parameter counts from config.json alone, the sharding arithmetic of each ZeRO
stage, and the estimate against the peak RSS of real CPU runs (tiny and real-vocabulary models)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from r1_mm.config.recipe import load_recipe
from r1_mm.jobs.plan import GIB, launch_fsdp_version, launch_zero_stage, model_shape, plan

from .conftest import REPO

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))


def test_parameter_counts_are_exact_without_loading_weights():
    from r1_mm.models.loading import load_model

    cfg = load_recipe(None, ["model.name_or_path=tiny:qwen2_5_vl", "model.lora=true"])
    shape = model_shape(cfg)
    model = load_model(cfg.model)
    assert shape.lora_params == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert shape.total_params == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def test_mixture_of_experts_holds_every_expert_and_computes_with_top_k():
    """Qwen3-VL-MoE: memory counts every expert, compute the router's top_k of them per token; its
    activations keep top_k experts' inputs; its visual tokens are 32 x 32 pixels (16-px patches, 2x2 merge)."""
    cfg = load_recipe(None, ["model.name_or_path=tiny:qwen3_vl_moe", "media.max_pixels=50176"])
    shape = model_shape(cfg)
    from r1_mm.models.loading import load_model

    model = load_model(cfg.model)
    text = model.config.text_config
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert experts > 0 and shape.total_params == sum(p.numel() for p in model.parameters())
    assert shape.active_params == shape.total_params - experts + experts * text.num_experts_per_tok // text.num_experts
    assert shape.active < shape.total_params
    assert shape.intermediate == text.num_experts_per_tok * text.moe_intermediate_size
    assert shape.pixels_per_token_side == 32
    table = plan(cfg, gpus=1, zero_stage=0, shape=shape).table()
    assert f"{shape.active / 1e9:.3f} B parameters active per token of {shape.total_params / 1e9:.3f} B" in table
    dense = model_shape(load_recipe(None, ["model.name_or_path=tiny:qwen2_5_vl"]))
    assert dense.active_params == 0 and dense.active == dense.total_params and dense.pixels_per_token_side == 28


def test_an_all_sparse_hybrid_decoder_is_planned():
    """Qwen3.5-MoE declares no dense intermediate_size (every decoder MLP is sparse, with a shared expert beside
    the routed ones): the plan ran into an AttributeError. Per token it computes top_k routed experts plus the
    shared one."""
    from r1_mm.models.hub import read_model_config

    cfg = load_recipe(None, ["model.name_or_path=tiny:qwen3_5_moe"])
    text = read_model_config(cfg.model).get_text_config()
    assert not hasattr(text, "intermediate_size")  # the premise
    shape = model_shape(cfg)
    assert shape.intermediate == (text.num_experts_per_tok * text.moe_intermediate_size
                                  + text.shared_expert_intermediate_size)
    assert 0 < shape.active_params < shape.total_params and shape.pixels_per_token_side == 32
    assert "parameters active per token" in plan(cfg, gpus=1, zero_stage=0, shape=shape).table()

def test_zero_stages_shard_what_they_shard():
    cfg = load_recipe(None, ["model.name_or_path=tiny:qwen2_5_vl", "model.dtype=bfloat16"])
    shape = model_shape(cfg)
    part = {s: {line.name: line.bytes for line in plan(cfg, gpus=8, zero_stage=s, mixed_bf16=True, shape=shape).lines}
            for s in range(4)}
    weights = shape.total_params * 2
    assert part[0]["policy weights"] == part[2]["policy weights"] == weights
    assert part[3]["policy weights"] == weights / 8 and part[3]["reference weights"] == weights / 8
    assert part[1]["gradients"] == weights and part[2]["gradients"] == weights / 8
    assert part[0]["optimizer states"] == 2 * weights  # DDP: torch AdamW's states in the parameters' dtype
    assert part[1]["optimizer states"] == part[3]["optimizer states"] == 12 * shape.total_params / 8  # fp32 master + states


def test_fsdp2_shards_like_zero3_with_float32_trainable_weights():
    """FSDP2 (recipes/accelerate/fsdp2.yaml, bf16): accelerate upcasts the trainable parameters to float32 (the
    sharded master), so weights, gradients and AdamW's 2 states are float32 and sharded over the processes; the
    frozen reference keeps the recipe's dtype, sharded too; the gathered units are a line of their own."""
    cfg = load_recipe(None, ["model.name_or_path=tiny:qwen2_5_vl", "model.dtype=bfloat16"])
    shape = model_shape(cfg)
    n = shape.total_params
    fsdp = plan(cfg, gpus=8, zero_stage=0, mixed_bf16=True, shape=shape, fsdp2=True)
    part = {line.name: line.bytes for line in fsdp.lines}
    assert (part["policy weights"], part["reference weights"]) == (4 * n / 8, 2 * n / 8)
    assert (part["gradients"], part["optimizer states"]) == (4 * n / 8, 8 * n / 8)
    assert 0 < part["FSDP2 gathered units"] < 2 * n  # a few units in bf16, never the whole model
    assert "8 process(es), FSDP2" in fsdp.table()
    frozen = {line.name: line.bytes for line in plan(load_recipe(None, [
        "model.name_or_path=tiny:qwen2_5_vl", "model.dtype=bfloat16", "model.freeze_vision_tower=true"]),
        gpus=8, zero_stage=0, mixed_bf16=True, shape=shape, fsdp2=True).lines}
    v = shape.vision_params
    assert frozen["policy weights"] == (4 * (n - v) + 2 * v) / 8  # the frozen tower is not upcast
    assert launch_fsdp_version(REPO / "recipes" / "accelerate" / "fsdp2.yaml") == 2
    assert launch_fsdp_version(REPO / "recipes" / "accelerate" / "zero3.yaml") is None
    assert launch_zero_stage(REPO / "recipes" / "accelerate" / "fsdp2.yaml") == (0, True)


def test_plan_reads_the_precision_the_launch_really_runs():
    """accelerate writes the YAML's mixed_precision into DeepSpeed's bf16 section; DeepSpeed then casts the
    model to bf16 and keeps a float32 master. Under 'no' a bf16 model keeps its dtype, but ZeRO accumulates
    gradients in float32 and still makes the float32 master (deepspeed runtime/engine.py, zero/stage3.py)."""
    cfg = load_recipe(None, ["model.name_or_path=tiny:qwen2_5_vl", "model.dtype=bfloat16"])
    shape = model_shape(cfg)
    n = shape.total_params

    def lines(zero_stage: int, bf16: bool, dtype: str = "bfloat16") -> dict[str, float]:
        c = load_recipe(None, ["model.name_or_path=tiny:qwen2_5_vl", f"model.dtype={dtype}"])
        return {line.name: line.bytes for line in plan(c, gpus=8, zero_stage=zero_stage, mixed_bf16=bf16, shape=shape).lines}

    bf16, no = lines(3, True), lines(3, False)
    assert (bf16["policy weights"], bf16["gradients"], bf16["optimizer states"]) == (2 * n / 8, 2 * n / 8, 12 * n / 8)
    assert (no["policy weights"], no["gradients"], no["optimizer states"]) == (2 * n / 8, 4 * n / 8, 12 * n / 8)
    fp32_no, fp32_bf16 = lines(3, False, "float32"), lines(3, True, "float32")
    assert (fp32_no["policy weights"], fp32_no["optimizer states"]) == (4 * n / 8, 8 * n / 8)  # ZeRO-3 shares the fp32 master
    assert fp32_bf16["policy weights"] == 2 * n / 8  # a bf16 DeepSpeed launch casts a float32 model
    assert launch_zero_stage(REPO / "recipes" / "accelerate" / "zero3.yaml") == (3, True)
    assert launch_zero_stage(REPO / "recipes" / "accelerate" / "ddp.yaml") == (0, False)


PAPER_RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml") if not p.stem.startswith("demo"))


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=lambda p: p.stem)
def test_paper_recipe_launch_config_and_plan_agree(path):
    """The launch config a paper recipe's header names runs the recipe's dtype on a GPU (else the run stops
    at load in one line), and `r1-mm plan --launch` with it counts that dtype's bytes."""
    import yaml

    from r1_mm.trainers.backend import precision_problem

    header = path.read_text()
    launch = REPO / re.search(r"--config_file (recipes/accelerate/\S+\.yaml)", header).group(1)
    processes = re.search(r"--config_file \S+ --num_processes (\d+)", header).group(1)
    assert re.search(rf"r1-mm plan recipes/{path.stem}\.yaml --gpus {processes} --launch {launch.relative_to(REPO)}", header)
    recipe = load_recipe(path)
    assert recipe.model.dtype == "bfloat16"
    mixed = str(yaml.safe_load(launch.read_text())["mixed_precision"])
    assert precision_problem(recipe, mixed_precision=mixed, cuda=True, deepspeed=True) is None  # a GPU machine, described
    stage, bf16 = launch_zero_stage(launch)
    assert (stage, bf16) == (3, True)
    # the shape does not change the bytes per parameter (a distillation teacher's neither)
    cfg = load_recipe(path, ["model.name_or_path=tiny:qwen2_5_vl", "algorithm.distill.teacher=tiny:qwen2_5_vl"])
    shape = model_shape(cfg)
    got = {line.name: line for line in plan(cfg, gpus=8, zero_stage=stage, mixed_bf16=bf16, shape=shape).lines}
    assert got["policy weights"].bytes == (shape.total_params + shape.lora_params) * 2 / 8
    assert "12 bytes: float32 master + 2 AdamW states (DeepSpeed bf16)" in got["optimizer states"].note
    # the mismatch the shipped zero3.yaml had: one line at load, naming both sides
    line = precision_problem(recipe, mixed_precision="no", cuda=True, deepspeed=True)
    assert line and "\n" not in line and "model.dtype=bfloat16" in line and "mixed_precision 'no'" in line
    assert precision_problem(recipe, mixed_precision="no", cuda=False, deepspeed=True) is None  # CPU runs: not checked


def test_plan_counts_the_video_tokens_the_loader_gives():
    """vsGRPO's 16 frames at 200,704 pixels each: 8 temporal patches x 256 tokens, as data/media.py budgets them
    (the planner once divided a default whole-video budget instead: 128 tokens for the whole video)."""
    from r1_mm.jobs.plan import visual_tokens_per_prompt

    cfg = load_recipe(REPO / "recipes" / "vsgrpo_qwen2vl_2b.yaml", ["model.name_or_path=tiny:qwen2_vl"])
    assert visual_tokens_per_prompt(cfg) == 8 * 256
    result = plan(cfg, gpus=8, zero_stage=3, mixed_bf16=True)
    assert "16 frames = 8 temporal patches (2 frames each) x 256 tokens per frame = 2048 visual tokens" in result.table()


RECIPE = """
data: {{max_prompt_length: 512, format_instruction: null}}
media: {{min_pixels: 50176, max_pixels: 50176}}
rollout: {{num_generations: {g}, max_completion_length: {c}}}
rewards: {{functions: [{{name: "{plugin}:length_reward"}}]}}
algorithm: {{grpo: {{beta: 0.04}}}}
training: {{max_steps: 2, prompts_per_step: 1, learning_rate: 1.0e-4}}
logging: {{progress_bar: false}}
"""


# the real vocabulary only: the shape users run (the tiny-vocabulary case, 34 s, checked the same estimator
# where the runtime dwarfs the model, and was dropped for suite time)
@pytest.mark.parametrize(("model", "g", "c"), [("tiny:qwen2_5_vl:vocab=151936", 8, 128)], ids=["real_vocabulary"])
def test_estimate_is_within_30_percent_of_a_measured_cpu_run(tmp_path, synthetic_data, tiny_cache, model, g, c):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(g=g, c=c, plugin=REPO / "tests" / "plugins" / "test_rewards.py"))
    overrides = [f"model.name_or_path={model}", f"data.train_path={synthetic_data['counting']}",
                 f"training.output_dir={tmp_path / 'run'}"]
    # a clean environment: what earlier tests left in this process's environment (service sockets, library
    # paths, logging levels of engines they started) must not change what the run under measurement loads
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "WANDB_MODE")
           if k in os.environ}
    env["R1MM_CACHE"] = str(tiny_cache.parent)
    estimate = subprocess.run([str(BIN / "r1-mm"), "plan", str(recipe), *overrides, "--cpu", "--json"], env=env,
                              capture_output=True, text=True, timeout=300)
    assert estimate.returncode == 0, estimate.stderr[-2000:]
    planned = json.loads(estimate.stdout)["total_bytes"]
    run = subprocess.run([str(BIN / "r1-mm"), "train", str(recipe), *overrides], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = max(m["memory/peak_rss_mib"] for m in metrics) * 2**20
    assert min(m["completions/mean_length"] for m in metrics) > 0.8 * c  # the shapes the estimate assumes
    assert abs(planned - measured) / measured < 0.30, (planned / GIB, measured / GIB)


INHERIT = """
import subprocess, sys
ballast = bytearray(600 * 2**20)  # the parent holds 600 MiB when it starts the child
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
child = "import resource; from r1_mm.core.memory import peak_rss_bytes; print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout)
"""


def test_peak_memory_is_the_process_own():
    """ru_maxrss survives fork + exec on Linux (a child of a big test runner reports the runner's peak);
    the measure the runs log does not."""
    proc = subprocess.run([sys.executable, "-c", INHERIT], capture_output=True, text=True, timeout=120)
    own, inherited = map(int, proc.stdout.split())
    assert inherited > 600 * 2**20 and own < 300 * 2**20, (own, inherited)


def test_plan_counts_a_tool_trajectory_at_its_whole_budget():
    """A tool recipe's completion is a trajectory: the planner counts tools.max_total_tokens, not one turn's tokens."""
    base = ["model.name_or_path=tiny:qwen2_5_vl", "rollout.max_completion_length=64"]
    one = plan(load_recipe(None, base), gpus=8, zero_stage=3, mixed_bf16=True)
    tools = plan(load_recipe(None, [*base, "tools.functions=[crop_image]", "tools.max_total_tokens=2048"]),
                 gpus=8, zero_stage=3, mixed_bf16=True)
    assert tools.total_bytes > one.total_bytes


def test_plan_sizes_a_token_budget_micro_batch_by_the_budget():
    """Under training.max_tokens_per_micro_batch a micro-batch holds as many worst-case groups as the budget
    does (one at least, prompts_per_step at most), the same activations as that many prompts per micro-batch."""
    base = ["model.name_or_path=tiny:qwen2_5_vl", "rollout.max_completion_length=64", "rollout.num_generations=4",
            "data.max_prompt_length=512", "training.prompts_per_step=8"]
    packed = 512 + 4 * 64

    def lm(*extra):
        lines = plan(load_recipe(None, [*base, *extra]), gpus=8, zero_stage=3, mixed_bf16=True).lines
        return next(line for line in lines if line.name == "activations: language model")

    for budget, groups in ((4 * packed + 5, 4), (packed - 1, 1), (100 * packed, 8)):
        by_tokens = lm(f"training.max_tokens_per_micro_batch={budget}")
        by_rows = lm(f"training.micro_batch_size={groups}")
        assert (by_tokens.bytes, f"({groups} prompt(s)") == (by_rows.bytes, f"({groups} prompt(s)"), budget
        assert f"({groups} prompt(s)" in by_tokens.note
