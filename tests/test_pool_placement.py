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


# -- CPU machines: rollout.pool_cpu_cores gives each server cores of its own, the learners the rest ----------------

def test_core_lists_parse_and_print_back():
    from r1_mm.core.cpu_cores import compact, learner_cores, parse_cores

    assert parse_cores("1") == [1] and parse_cores(3) == [3] and parse_cores("0,2-4") == [0, 2, 3, 4]
    assert compact({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8" and compact([4]) == "4"
    assert learner_cores(["1", "4-5"], {0, 1, 2, 3, 4, 5}) == [0, 2, 3]
    for bad in ("x", "3-1", "1-", ""):
        with pytest.raises(ValueError, match="not a core list"):
            parse_cores(bad)


@pytest.mark.parametrize("overrides, named", [
    (["rollout.engine=hf", "rollout.pool_cpu_cores=[1]"], "needs rollout.engine=vllm_pool"),
    (["rollout.engine=vllm_pool", "rollout.pool_servers=['http://h:1']", "rollout.pool_cpu_cores=[1]"],
     "no rollout.pool_servers"),
    (["rollout.engine=vllm_pool", "rollout.pool_size=2", "rollout.pool_cpu_cores=[1]"], "has 1 entry for"),
    (["rollout.engine=vllm_pool", "rollout.pool_size=2", "rollout.pool_cpu_cores=[1-2, 2]"],
     "pool_cpu_cores[1] (2) shares core(s) [2]"),
    (["rollout.engine=vllm_pool", "rollout.pool_size=1", "rollout.pool_cpu_cores=[one]"], "pool_cpu_cores[0]: 'one'"),
])
def test_pool_cpu_cores_the_recipe_cannot_mean_stop_at_load(overrides, named):
    with pytest.raises(ConfigError) as err:
        load_recipe(None, overrides)
    assert named in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("cores, cuda, named", [
    ("[0-1]", False, "takes every core this process may use (0-1): leave at least one for the learner"),
    ("[2]", False, "names core(s) [2] this process may not use (allowed: 0-1)"),
    ("[1]", True, "is for CPU machines"),
])
def test_pool_cpu_cores_the_machine_cannot_give_stop_at_preflight(cores, cuda, named):
    from r1_mm.run.preflight import Machine, problems

    cfg = load_recipe(None, ["rollout.engine=vllm_pool", "rollout.pool_size=1", f"rollout.pool_cpu_cores={cores}"])
    machine = Machine(cuda=cuda, deepspeed_launch=False, has_package=lambda _: True, cpu_cores={0, 1})
    found = [p for p in problems(cfg, machine) if "pool_cpu_cores" in p]
    assert len(found) == 1 and named in found[0]
    ok = load_recipe(None, ["rollout.engine=vllm_pool", "rollout.pool_size=1", "rollout.pool_cpu_cores=[1]"])
    assert not [p for p in problems(ok, Machine(cuda=False, deepspeed_launch=False, has_package=lambda _: True,
                                                cpu_cores={0, 1})) if "pool_cpu_cores" in p]


def test_a_pinned_server_process_runs_on_its_cores_with_a_thread_each(tmp_path, monkeypatch):
    """The real process: ServerProcess applies the affinity before exec (what a rollout server's /health then
    reports), and ManagedServer's environment gives torch one thread per core and turns vLLM's binding off."""
    import os
    import sys

    from r1_mm.rollout.servers import ServerProcess

    assert {0, 1} <= os.sched_getaffinity(0)
    out = tmp_path / "affinity"

    class Probe(ServerProcess):
        def command(self):
            return [sys.executable, "-c", f"import os; open({str(out)!r}, 'w').write(str(sorted(os.sched_getaffinity(0))))"]

    probe = Probe()
    probe.cpus = [1]
    probe.start(wait=False)
    probe.process.wait(timeout=60)
    assert out.read_text() == "[1]" and os.sched_getaffinity(0) >= {0, 1}  # the child's, not this process's
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    cfg = load_recipe(None, ["model.name_or_path=/models/x", "rollout.engine=vllm_pool", "rollout.pool_size=1",
                             "rollout.pool_cpu_cores=[1]"])
    env = ManagedServer(cfg, 8103, tmp_path, cpus=[1]).environment()
    assert env["OMP_NUM_THREADS"] == "1" and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
