"""The zoom-in demo, shortened (`r1-mm demo --task zoom`): the SFT stage teaches the tiny model the crop_image call,
then GRPO with the tool samples calls that are executed (the tool's image is in the trajectory) and rewarded (the
tool_use reward scores every trajectory: 1 exactly when a call ran and the answer is right), and the same GRPO
without tools runs beside it. The full demo's curves are in README (the command there)."""

from __future__ import annotations

import json

import pytest

from r1_mm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_the_zoom_demo_calls_executes_and_rewards_the_tool(tmp_path):
    out = tmp_path / "zoom"
    # the hf engine here (no vLLM start-up), 2 GRPO steps per run; the SFT long enough to write calls, sampled at T=0.5 (a short SFT still mangles some calls at T=1)
    assert main(["demo", "--task", "zoom", "--out", str(out), "--rows", "64", "--sft-steps", "200", "rollout.temperature=0.5",
                 "rollout.engine=hf", "training.max_steps=2", "training.prompts_per_step=4",
                 "rollout.num_generations=4", "training.save_steps=null", "logging.progress_bar=false"]) == 0
    sft = _rows(out / "sft" / "metrics.jsonl")
    assert len(sft) == 200 and sft[-1]["train/loss"] < 0.5 * sft[0]["train/loss"]

    metrics = _rows(out / "tools" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1]
    assert any(m["tools/call_rate"] > 0 for m in metrics)  # the SFT model calls, and the calls run
    completions = _rows(out / "tools" / "completions.jsonl")
    called = [c for c in completions if c["trajectory"]["executed_calls"] > 0]
    assert called, "no executed call in the completions log"
    for c in called:
        (call,) = c["trajectory"]["calls"]
        assert call["name"] == "crop_image" and call["status"] == "ok" and call["images"] == 1
        assert len(c["tool_images"]) == 1 and (out / "tools" / c["tool_images"][0]).exists()
    for c in completions:  # rewarded: tool_use scores every trajectory, and pays exactly for a right answer with a call
        paid = c["trajectory"]["executed_calls"] > 0 and c["rewards"]["accuracy"] > 0.5
        assert c["rewards"]["tool_use"] == float(paid)

    baseline = _rows(out / "no_tools" / "metrics.jsonl")
    assert [m["step"] for m in baseline] == [0, 1] and not any("tools/call_rate" in m for m in baseline)
    assert (out / "comparison.png").stat().st_size > 1000
