"""bench/grpo_e2e.py at its smallest configuration: the whole-step benchmark runs TRL's GRPOTrainer and r1-mm's
(synchronous and K=1), forces the completion length on every side and ends with its one-line JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def test_force_length_patches_every_engine_and_undoes():
    sys.path.insert(0, str(BENCH))
    try:
        import grpo_e2e
    finally:
        sys.path.remove(str(BENCH))
    from r1_mm.rollout import hf, vllm_colocate, vllm_pool
    from r1_mm.rollout.base import SamplingSettings

    settings = SamplingSettings(max_tokens=12)
    before = vllm_pool.sampling_kwargs(settings, 8, [])
    undo = grpo_e2e.force_length()
    try:
        assert vllm_pool.sampling_kwargs(settings, 8, [])["min_tokens"] == 12
        assert vllm_colocate.sampling_kwargs(settings, 8, [])["min_tokens"] == 12
        engine = hf.HFRolloutEngine.__new__(hf.HFRolloutEngine)
        engine.tokenizer = type("T", (), {"pad_token_id": 0, "eos_token_id": 1})()
        engine.model = type("M", (), {"config": None, "generation_config": None})()
        assert hf.HFRolloutEngine._generate_kwargs(engine, settings, 12)["min_new_tokens"] == 12
    finally:
        undo()
    assert "min_tokens" not in vllm_pool.sampling_kwargs(settings, 8, [])
    assert vllm_pool.sampling_kwargs(settings, 8, []) == before


@pytest.mark.slow
def test_smallest_e2e_run_ends_with_the_json(tmp_path, tiny_cache):
    """Tiny vocabulary, 56 px image, 8-token completions, 2 steps (one timed), one round; the asynchronous pair on
    hf (no vLLM server to start) and TRL on hf generate (no probe of its vLLM mode)."""
    dump = tmp_path / "runs.json"
    cmd = [sys.executable, str(BENCH / "grpo_e2e.py"), "--vocab", "0", "--image-size", "56", "--tokens", "8",
           "--steps", "2", "--rounds", "1", "--cases", "image", "--trl-engine", "hf", "--systems", "trl,sync,async",
           "--async-engine", "hf", "--data", str(tmp_path / "data"), "--dump", str(dump)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "R1MM_CACHE": str(tiny_cache.parent), "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert set(summary) == {"trl", "sync", "async"}
    assert all(isinstance(v, float) and v > 0 for v in summary.values())
    assert any(line.startswith("| image | trl | TRL GRPOTrainer | hf |") for line in lines)
    runs = {r["system"]: r for r in json.loads(dump.read_text())["runs"]}
    # the premise: the trl row ran TRL's own trainer, with the generation it names
    assert runs["trl"]["trainer"] == "trl.trainer.grpo_trainer.GRPOTrainer"
    assert runs["trl"]["generation"] == "hf generate"
    assert runs["sync"]["trainer"] == runs["async"]["trainer"] == "r1_mm.trainers.grpo.GRPOTrainer"
    assert (runs["sync"]["max_staleness"], runs["async"]["max_staleness"]) == (0, 1)
    # same shapes on every side: the prompt, and every step's G x 8 forced completion tokens
    assert len({(r["prompt_tokens"], r["visual_tokens"]) for r in runs.values()}) == 1
    assert runs["trl"]["visual_tokens"] == 4
    assert all(step["tokens"] == 8 * 8 for r in runs.values() for step in r["steps"])
    assert all(len(r["steps"]) == 2 for r in runs.values())
    # every timed step learned and sampled (K=1 interleaved on hf: step t samples step t+1's batch; the run's extra
    # last step, which has nothing left to sample, is not among them)
    assert all(step["learn"] > 0 and step["rollout"] > 0 for r in runs.values() for step in r["steps"])
