"""How a run is started: the launch config and the machine pick back-end and device (never a forced-CPU
default), and what cannot run stops before the model loads, in one line that says what to do.

The GPU rows of the decision table use ``cuda=True`` as an argument: there is no CUDA device here.
Real launches of every back-end are in test_backends.py, which reads the resulting run_info.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from r1_mm.config.recipe import ConfigError, load_recipe
from r1_mm.run.preflight import Machine, preflight
from r1_mm.trainers.backend import accelerator_kwargs, configure_deepspeed

from .conftest import REPO

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(("cuda", "deepspeed", "use_cpu", "expected"), [
    (True, False, False, {"cpu": False}),  # GPUs: accelerate's own choice (DDP on GPUs, or one GPU)
    (True, True, False, {"cpu": False}),  # GPUs + DeepSpeed config: DeepSpeed on GPUs
    (True, False, True, {"cpu": True}),  # a user forcing the CPU on a GPU machine
    (False, False, False, {"cpu": True}),  # CPU machine: accelerate's multi-process CPU (gloo DDP) needs cpu=True
    (False, True, False, {}),  # CPU + DeepSpeed: cpu=True would silently run DDP; gloo is named instead
    (True, "fsdp", False, {"cpu": False}),  # GPUs + FSDP: accelerate's own FSDP
    (False, "fsdp", False, {}),  # CPU + FSDP: cpu=True would silently run DDP; gloo is named (FSDP set by r1-mm)
])
def test_accelerator_construction_follows_machine_and_launch(cuda, deepspeed, use_cpu, expected):
    cfg = load_recipe(None, [f"training.use_cpu={str(use_cpu).lower()}", "training.prompts_per_step=4",
                             "training.gradient_accumulation_steps=2"])
    fsdp = deepspeed == "fsdp"
    kwargs = accelerator_kwargs(cfg, cuda=cuda, deepspeed_launch=deepspeed is True, fsdp_launch=fsdp)
    assert kwargs["gradient_accumulation_steps"] == 2 and kwargs["step_scheduler_with_optimizer"] is False
    assert {k: v for k, v in kwargs.items() if k == "cpu"} == expected
    handlers = kwargs.get("kwargs_handlers", [])
    assert [h.backend for h in handlers] == (["gloo"] if deepspeed and not cuda else [])


def test_use_cpu_defaults_to_false():
    assert load_recipe(None).training.use_cpu is False


def machine(cuda=False, deepspeed=False, packages=()):
    return Machine(cuda=cuda, deepspeed_launch=deepspeed, has_package=lambda name: name in packages)


def test_flash_attention_needs_cuda_and_its_package_and_says_so():
    cfg = load_recipe(None, ["model.attn_implementation=flash_attention_2", "model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match="needs a CUDA device and this machine has none; use model.attn_implementation=sdpa"):
        preflight(cfg, machine(), read_model_config=False)
    with pytest.raises(ConfigError, match="needs the flash_attn package: install it") as missing:
        preflight(cfg, machine(cuda=True), read_model_config=False)
    # the line names the pinned requirement, and that file pins one exact version
    assert "-r requirements/flash-attn.txt" in str(missing.value)
    pins = [line for line in (REPO / "requirements" / "flash-attn.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert len(pins) == 1 and pins[0].startswith("flash-attn==")
    preflight(cfg, machine(cuda=True, packages=("flash_attn",)), read_model_config=False)  # a GPU box with flash-attn


def test_impossible_combinations_are_rejected_when_the_recipe_loads():
    with pytest.raises(ConfigError, match="needs model.dtype bfloat16 or float16"):
        load_recipe(None, ["model.attn_implementation=flash_attention_2"])  # float32 default
    cfg = load_recipe(None, ["training.use_cpu=true"])
    with pytest.raises(ConfigError, match="cannot apply to a DeepSpeed launch"):
        preflight(cfg, machine(deepspeed=True), read_model_config=False)
    with pytest.raises(ConfigError, match="cannot apply to an FSDP launch"):
        preflight(cfg, Machine(cuda=True, deepspeed_launch=False, has_package=lambda _: False, fsdp_launch=True),
                  read_model_config=False)


def test_deepspeed_accumulation_comes_from_the_recipe():
    cfg = load_recipe(None, ["training.prompts_per_step=4", "training.micro_batch_size=2", "training.max_grad_norm=0.5"])
    ds = {"gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}
    configure_deepspeed(ds, cfg)
    assert ds == {"gradient_accumulation_steps": 2, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.5}
    with pytest.raises(ConfigError, match="sets gradient_accumulation_steps=1 .* the recipe's"):
        configure_deepspeed({"gradient_accumulation_steps": 1}, cfg)
    # a token budget: the engine gets the bound (one prompt per micro-batch), the count is set per step
    budget = load_recipe(None, ["training.prompts_per_step=4", "training.max_tokens_per_micro_batch=1000"])
    ds = {"gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": "auto"}
    configure_deepspeed(ds, budget)
    assert (ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"]) == (4, 1)
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch sets it per step"):
        configure_deepspeed({"gradient_accumulation_steps": 1}, budget)


def test_flash_recipe_on_this_machine_stops_in_one_line_before_the_model_loads(tmp_path):
    """The model path does not exist: the only way to get the flash error is to check before loading it."""
    proc = subprocess.run([str(BIN / "r1-mm"), "train", str(Path(__file__).parent.parent / "recipes" / "vsgrpo_qwen2vl_2b.yaml"),
                           f"model.name_or_path={tmp_path / 'no-such-model'}", f"training.output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "needs a CUDA device" in errors[0] and "attn_implementation=sdpa" in errors[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
