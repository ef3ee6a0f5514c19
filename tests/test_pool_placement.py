"""Pool servers the run starts get GPUs of their own and a memory share, checked from the command line
and environment each start builds. Before, every server took GPU 0 (where learner rank 0 lives) at
vLLM's default share: vLLM refused to start, and a second server failed regardless. No GPU exists
here: GPU counts are given to the placement function, which is what the pool calls with
torch.cuda.device_count()."""

from __future__ import annotations

import pytest

from r1_mm.config.recipe import ConfigError, load_recipe
from r1_mm.rollout.vllm_pool import ManagedServer, server_devices


def test_servers_take_the_gpus_after_the_learners():
    assert server_devices(2, 1, learners_here=6, gpus_here=8) == [[6], [7]]
    assert server_devices(2, 2, learners_here=4, gpus_here=8) == [[4, 5], [6, 7]]
    assert server_devices(2, 1, learners_here=2, gpus_here=0) == [[], []]  # CPU machine: nothing to place


def test_too_few_gpus_is_one_line_naming_the_fields():
    with pytest.raises(ConfigError) as err:
        server_devices(2, 1, learners_here=8, gpus_here=8)
    message = str(err.value)
    assert "\n" not in message and "rollout.pool_size=2" in message and "--num_processes 6" in message


def test_each_server_start_names_its_devices_and_memory_share(tmp_path):
    cfg = load_recipe(None, ["model.name_or_path=/models/x", "rollout.engine=vllm_pool",
                             "rollout.pool_gpu_memory_utilization=0.85", "rollout.vllm_executor=mp"])
    servers = [ManagedServer(cfg, 8100 + i, tmp_path, devices=d)
               for i, d in enumerate(server_devices(2, 1, learners_here=6, gpus_here=8))]
    assert [s.environment()["CUDA_VISIBLE_DEVICES"] for s in servers] == ["6", "7"]
    command = servers[0].command()
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.85"
    assert command[command.index("--executor") + 1] == "mp"
    # a CPU machine's server keeps the caller's environment
    cpu = ManagedServer(cfg, 8102, tmp_path, devices=[])
    assert "CUDA_VISIBLE_DEVICES" not in cpu.environment() or cpu.environment()["CUDA_VISIBLE_DEVICES"] == \
        __import__("os").environ.get("CUDA_VISIBLE_DEVICES")


@pytest.mark.parametrize("override", ["rollout.vllm_tensor_parallel_size=2", "rollout.vllm_data_parallel_size=2"])
@pytest.mark.parametrize("engine", ["vllm_colocate", "vllm_pool"])
def test_parallel_engine_layouts_are_refused_at_load(override, engine):
    from r1_mm.run.preflight import engine_parallelism_problems

    cfg = load_recipe(None, [f"rollout.engine={engine}", override])
    problems = engine_parallelism_problems(cfg)
    assert len(problems) == 1 and override.split("=")[0] in problems[0]
    assert engine_parallelism_problems(load_recipe(None, ["rollout.engine=hf", override])) == []


def test_server_refuses_tensor_parallel_in_one_line():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "r1_mm.cli", "serve", "rollout", "--model", "/nonexistent",
                           "--tensor-parallel-size", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "one server per GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_engine_sizing_reaches_the_server_command_line(tmp_path):
    sized = load_recipe(None, ["model.name_or_path=/models/x", "rollout.engine=vllm_pool",
                               "rollout.vllm_max_num_batched_tokens=4096", "rollout.vllm_max_num_seqs=64"])
    command = ManagedServer(sized, 8100, tmp_path).command()
    assert command[command.index("--max-num-batched-tokens") + 1] == "4096"
    assert command[command.index("--max-num-seqs") + 1] == "64"
    default = ManagedServer(load_recipe(None, ["rollout.engine=vllm_pool"]), 8100, tmp_path).command()
    assert "--max-num-batched-tokens" not in default and "--max-num-seqs" not in default  # vLLM's defaults


@pytest.mark.parametrize(("overrides", "named"), [
    (["rollout.vllm_max_num_batched_tokens=32", "rollout.vllm_max_num_seqs=64"], "rollout.vllm_max_num_seqs=64"),
    (["rollout.vllm_max_num_batched_tokens=512"], "set rollout.vllm_max_num_seqs to at most 512"),
])
def test_engine_sizing_vllm_would_refuse_stops_at_load_in_one_line(overrides, named):
    """vLLM refuses max_num_batched_tokens < max_num_seqs at engine start, after the learner has loaded."""
    from r1_mm.run.preflight import Machine, preflight

    cfg = load_recipe(None, ["rollout.engine=vllm_colocate", *overrides])
    with pytest.raises(ConfigError) as err:
        preflight(cfg, Machine(cuda=False, deepspeed_launch=False, has_package=lambda _: True), read_model_config=False)
    message = str(err.value)
    assert "\n" not in message and "rollout.vllm_max_num_batched_tokens" in message and named in message
    fine = load_recipe(None, ["rollout.engine=vllm_colocate", "rollout.vllm_max_num_batched_tokens=4096"])
    preflight(fine, Machine(cuda=False, deepspeed_launch=False, has_package=lambda _: True), read_model_config=False)
