"""Two "machines" on one: two `accelerate launch` commands (machine_rank 0 and 1, num_machines 2, the
multi-node ZeRO-3 config as shipped) that meet over the machine's network address, with rollout
servers addressed by URL. Every test checks from run_info.json that the launch really spanned two
machines under DeepSpeed ZeRO-3, and which weight sync ran."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from r1_mm.core.topology import address_towards
from r1_mm.rollout.servers import free_port

from .conftest import ACCELERATE_LAUNCH, REPO, stop_process_group

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CONFIG = REPO / "recipes" / "accelerate" / "multinode_zero3.yaml"
RECIPE = """
model: {name_or_path: "tiny:qwen2_5_vl:small"}
data: {format_instruction: null, max_prompt_length: 512}
media: {min_pixels: 3136, max_pixels: 3136}
rollout: {num_generations: 2, max_completion_length: 3, vllm_dtype: float32, vllm_max_model_len: 1024}
rewards: {functions: [{name: numeric, kwargs: {require_tag: false}}]}
training: {max_steps: 2, prompts_per_step: 2, learning_rate: 1.0e-3}
logging: {progress_bar: false}
"""


def machine_address() -> str:
    """This machine's address on its network (not loopback), as a second machine would reach it: its
    own address on the route out of the machine."""
    return address_towards("192.0.2.1")


@pytest.fixture(scope="module")
def ip() -> str:
    address = machine_address()
    assert not address.startswith("127."), "the test needs a non-loopback address to stand for a network"
    return address


def launch_two_machines(tmp_path: Path, ip: str, data: Path, cache: Path, *overrides: str,
                        wrap_second: list[str] | None = None) -> list[subprocess.CompletedProcess]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    port = free_port(ip)
    env = dict(os.environ, R1MM_CACHE=str(cache.parent))
    procs = []
    for machine in (0, 1):
        # the shipped config runs bf16 on GPUs; this CPU test trains float32 (accelerate's own flag overrides it)
        cmd = [*ACCELERATE_LAUNCH, "--config_file", str(CONFIG), "--mixed_precision", "no",
               "--machine_rank", str(machine),
               "--main_process_ip", ip, "--main_process_port", str(port), "-m", "r1_mm.train", str(recipe),
               f"data.train_path={data}", f"training.output_dir={tmp_path / 'run'}", *overrides]
        if machine == 1 and wrap_second:
            cmd = [*wrap_second, " ".join(f"'{c}'" for c in cmd)]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def assert_two_machines_zero3(run: Path) -> dict:
    info = json.loads((run / "run_info.json").read_text())
    assert (info["num_machines"], info["num_processes"], info["distributed_type"], info["zero_stage"]) == \
        (2, 2, "DEEPSPEED", 3), info
    assert info["partitioned_parameters"] > 0 and info["local_parameter_elements"] <= info["full_parameter_elements"] // 2 + 64
    return info


@pytest.fixture()
def rollout_server(tmp_path, ip, tiny_cache):
    """A rollout server on the network address, as on a rollout machine of its own."""
    port = free_port(ip)
    log = tmp_path / "server.log"
    env = dict(os.environ, R1MM_CACHE=str(tiny_cache.parent))
    proc = subprocess.Popen([str(BIN / "r1-mm"), "serve", "rollout", "--model", "tiny:qwen2_5_vl:small", "--host", ip,
                             "--port", str(port), "--dtype", "float32", "--max-model-len", "1024"],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{ip}:{port}"
    for _ in range(300):
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    try:
        yield url
    finally:
        stop_process_group(proc)


def test_learners_on_two_machines_with_a_server_addressed_by_url(tmp_path, ip, synthetic_data, tiny_cache,
                                                                  rollout_server):
    """The server is not on loopback, so weights go by broadcast; rank 0 joins the group at its own
    network address (what the server can connect back to), not 127.0.0.1."""
    done = launch_two_machines(tmp_path, ip, synthetic_data["counting"], tiny_cache, "rollout.engine=vllm_pool",
                               f"rollout.pool_servers=[{rollout_server}]")
    for p in done:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    info = assert_two_machines_zero3(tmp_path / "run")
    engine = info["rollout_engine_info"]
    assert (engine["servers"], engine["weight_sync"], engine["sync_host"]) == ([rollout_server], "broadcast", ip)
    assert httpx.get(f"{rollout_server}/health").json()["weights_version"] == 3  # the start + one per step
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]


def test_a_pool_started_by_rank_0_is_reached_from_the_other_machine(tmp_path, ip, synthetic_data, tiny_cache):
    """Servers rank 0 starts listen on machine 0's address (MASTER_ADDR), so rank 1 on machine 1 samples too."""
    done = launch_two_machines(tmp_path, ip, synthetic_data["counting"], tiny_cache, "rollout.engine=vllm_pool",
                               "rollout.pool_size=1")
    for p in done:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    info = assert_two_machines_zero3(tmp_path / "run")
    (url,) = info["rollout_engine_info"]["servers"]
    assert httpx.URL(url).host == ip and info["main_address"] == ip
    assert info["rollout_engine_info"]["weight_sync"] == "shm"  # the servers run beside rank 0


def test_an_output_dir_not_shared_by_both_machines_stops_the_run(tmp_path, ip, synthetic_data, tiny_cache):
    """Machine 1 gets a private filesystem over the run folder (a mount namespace with a tmpfs): the run
    stops on both machines with one line, before any weights load."""
    (tmp_path / "run").mkdir()
    wrap = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs none {tmp_path / 'run'} && exec \"$0\" \"$@\"", "sh", "-c"]
    done = launch_two_machines(tmp_path, ip, synthetic_data["counting"], tiny_cache, wrap_second=wrap)
    assert all(p.returncode != 0 for p in done), [p.stderr[-2000:] for p in done]
    errors = [line for p in done for line in p.stderr.splitlines() if line.startswith("error:")]
    assert any("is not the same folder for every process" in line and "ranks [1]" in line for line in errors), \
        done[0].stderr[-3000:]
