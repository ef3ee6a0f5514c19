"""LoRA on the vision tower and projector (model.lora_vision), and adapter-only weight sync to the colocated vLLM
engine (rollout.weight_sync_lora=adapter): vLLM serves the PEFT adapter as a LoRA over the base weights it loaded
once, and the sampler's logprobs equal the learner's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from r1_mm.config.recipe import ConfigError, ModelConfig, load_recipe
from r1_mm.models.families.base import UnsupportedModelError
from r1_mm.models.forward.grouped import grouped_logprobs, pack_groups
from r1_mm.models.loading import apply_lora, vision_modules
from r1_mm.rollout import SamplingSettings

from .test_grouped_forward import G, compare, completions, load, prompts_for
from .test_vllm_engines import learner_logprobs, samples_for

VISION = ("visual", "vision_tower", "vision_model", "multi_modal_projector")


def lora_params(model, vision: bool) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n and any(v in n for v in VISION) == vision}


def logprobs_with_vision_adapters(model, processor, sample, completions,
                                  adapters: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The learner's logprobs of ``completions`` with the vision adapters set to ``adapters`` (then put back): what a
    sampler that missed the last vision-adapter update would give."""
    current = {n: p.detach().clone() for n, p in lora_params(model, vision=True).items()}
    with torch.no_grad():
        for n, p in lora_params(model, vision=True).items():
            p.copy_(adapters[n])
        try:
            return learner_logprobs(model, processor, sample, completions)
        finally:
            for n, p in lora_params(model, vision=True).items():
                p.copy_(current[n])


def move_adapters(model, seed: int, vision: bool | None = None) -> None:
    """Every LoRA weight (or the vision ones / the language ones) moved: B starts at zero, so an untouched adapter
    would change nothing and a test could not tell it was served."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n and (vision is None or any(v in n for v in VISION) == vision):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vision_lora_sits_on_the_tower_and_grouped_equals_naive(tiny_path, synthetic_data, family):
    model, processor = load(tiny_path, family)
    lora = apply_lora(model, ModelConfig(lora=True, lora_vision=True, lora_r=4, lora_alpha=4))
    vision = lora_params(lora, vision=True)
    tower_names = {n for n, m in lora.named_modules() if any(m is t for t in vision_modules(model))}
    # adapters on the tower's blocks and on its projector (merger), PEFT's names under the tower's module
    assert vision and all(any(n.startswith(t + ".") for t in tower_names) for n in vision)
    assert any(".blocks." in n and ".attn.qkv.lora_A" in n for n in vision)
    assert any(".merger." in n for n in vision)
    assert lora_params(lora, vision=False)  # the language model keeps its adapters
    move_adapters(lora, 0)  # B != 0: A gets gradient too
    lora.train()
    compare(lora, processor, prompts_for(processor, synthetic_data["counting"]))  # logprobs 1e-5, gradients 1e-4
    lora.zero_grad()
    # the grouped route's backward reaches every vision adapter
    packed = pack_groups(lora, prompts_for(processor, synthetic_data["counting"]),
                         completions(len(processor.tokenizer) - 16), G, processor.tokenizer.pad_token_id)
    lp, _ = grouped_logprobs(lora, packed, temperature=1.0)
    (lp * packed.completion_mask).sum().backward()
    # except (tiny Qwen3-VL) the deepstack merger added after the last decoder layer: it changes only the image
    # positions' final states, which no completion token reads
    last = f"deepstack_merger_list.{model.config.get_text_config().num_hidden_layers - 1}."
    assert not [n for n, p in vision.items() if last not in n and (p.grad is None or p.grad.abs().sum() == 0)]
    assert all(p.grad is not None for p in vision.values())


def test_merged_export_and_adapter_file_with_vision_lora(tiny_path, tmp_path):
    """The merged sync (rollout.weight_sync_lora=merged, and checkpoints) folds the vision adapters in too; the
    adapter sync's file holds exactly the adapters, the vision tower's included."""

    from r1_mm.models.weights import (
        checkpoint_format,
        iter_policy_weights,
        policy_weight_bytes,
    )

    model, _ = load(tiny_path, "qwen2_5_vl")
    lora = apply_lora(model, ModelConfig(lora=True, lora_vision=True, lora_r=4, lora_alpha=4))
    move_adapters(lora, 0)
    merged = dict(iter_policy_weights(lora, bucket_mb=1))
    base = dict(iter_policy_weights(lora, bucket_mb=1, merge_lora=False))
    reference = checkpoint_format(model)(lora.merge_and_unload(safe_merge=True).state_dict())
    assert set(merged) == set(reference) == set(base)
    assert all(torch.allclose(merged[k], reference[k], atol=1e-6) for k in reference)
    qkv = next(k for k in reference if k.startswith("visual.blocks.0.attn.qkv.weight"))
    assert not torch.allclose(merged[qkv], base[qkv])  # the premise: the vision adapter changed the merged weight
    assert policy_weight_bytes(lora) == sum(t.numel() * t.element_size() for t in merged.values())


def test_adapter_file_holds_the_vision_adapters(tiny_path, tmp_path):
    from safetensors import safe_open

    from r1_mm.models.weights import save_lora_adapter

    model, _ = load(tiny_path, "qwen2_5_vl")
    lora = apply_lora(model, ModelConfig(lora=True, lora_vision=True, lora_r=4, lora_alpha=4))
    size = save_lora_adapter(lora, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as saved:
        keys = list(saved.keys())
    assert any(k.startswith("base_model.model.model.visual.blocks.0.attn.qkv.lora_A") for k in keys)
    assert any(".visual.merger.mlp.0.lora_B" in k for k in keys)
    assert len(keys) == len([n for n, _ in lora.named_parameters() if "lora_" in n])
    assert size == sum(p.numel() * p.element_size() for n, p in lora.named_parameters() if "lora_" in n)


def test_vision_lora_is_refused_for_families_without_targets(tiny_path):
    model, _ = load(tiny_path, "gemma3")
    with pytest.raises(UnsupportedModelError, match="lora_vision.*gemma3"):
        apply_lora(model, ModelConfig(lora=True, lora_vision=True))


def test_adapter_sync_needs_lora_and_a_vllm_engine():
    with pytest.raises(ConfigError, match="weight_sync_lora=adapter"):
        load_recipe(None, ["rollout.engine=vllm_colocate", "rollout.weight_sync_lora=adapter"])
    with pytest.raises(ConfigError, match="weight_sync_lora=adapter"):
        load_recipe(None, ["rollout.engine=hf", "model.lora=true", "rollout.weight_sync_lora=adapter"])
    load_recipe(None, ["rollout.engine=vllm_pool", "model.lora=true", "rollout.weight_sync_lora=adapter"])  # test_pool_lora_sync
    with pytest.raises(ConfigError, match="lora_vision"):
        load_recipe(None, ["model.lora_vision=true"])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])  # one vLLM start each (~35 s)
def test_adapter_only_sync_to_the_colocated_engine(tmp_path, synthetic_data, tiny_cache, monkeypatch, family):
    """One engine: a GRPO step moves the adapters (the vision tower's too) and they reach vLLM as a LoRA, never as
    full weights; its logprobs equal the learner's, and differ from the base model's (the adapter was served)."""
    import r1_mm.rollout.vllm_colocate as colocate
    from r1_mm.run.tracking import read_metrics
    from r1_mm.trainers.grpo import GRPOTrainer

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    plugins = Path(__file__).parent / "plugins"
    cfg = load_recipe(None, [
        f"model.name_or_path=tiny:{family}:small", f"data.train_path={synthetic_data['counting']}",
        f"training.output_dir={tmp_path / 'run'}", "data.format_instruction=null", "rollout.num_generations=4",
        "rollout.max_completion_length=3", "training.prompts_per_step=2", "training.max_steps=1",
        "training.learning_rate=1e-2", "logging.progress_bar=false",
        f"rewards.functions=[{{name: '{plugins}/faulty.py:alternating'}}]",
        "rollout.vllm_dtype=float32", "rollout.vllm_max_model_len=2048", "data.max_prompt_length=1024",
        "model.lora=true", "model.lora_r=4", "model.lora_alpha=4", "model.lora_vision=true",
        "rollout.engine=vllm_colocate", "rollout.weight_sync_lora=adapter"])
    trainer = GRPOTrainer(cfg)
    engine, model, processor = trainer.engine, trainer.learner.unwrapped, trainer.processor
    assert engine.name == "vllm_colocate" and engine.lora_request is not None
    full_syncs: list[int] = []
    real_reload = colocate.reload_in_place
    monkeypatch.setattr(colocate, "reload_in_place", lambda *a, **k: (full_syncs.append(1), real_reload(*a, **k)))
    vision_b = {n: p.detach().clone() for n, p in lora_params(model, vision=True).items() if "lora_B" in n}
    monkeypatch.setattr(engine, "close", lambda: None)  # kept open past train() for the checks below
    trainer.train()
    # the GRPO step's gradient reached every vision adapter (B starts at zero; A has no gradient until B moves)
    moved = lora_params(model, vision=True)
    last = f"deepstack_merger_list.{model.config.get_text_config().num_hidden_layers - 1}."  # Qwen3-VL: see above
    assert not [n for n, b in vision_b.items() if last not in n and torch.equal(moved[n].detach(), b)]
    assert full_syncs == []  # the adapter alone went to the engine
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    assert read_metrics(cfg.training.output_dir)[-1]["sync/bytes"] == adapter_bytes
    assert engine.last_sync_bytes == adapter_bytes < engine.full_weight_bytes / 10
    assert engine.info()["sync_bytes"] == adapter_bytes
    samples = samples_for(cfg, processor, synthetic_data)[:1]  # the counting image
    sampling = SamplingSettings(max_tokens=8, seed=3)
    move_adapters(model, 1)  # larger moves than one step's, so the premises below have room
    engine.update_weights(model)
    assert full_syncs == []
    out = engine.generate(samples, 2, sampling)[0]
    sampler = [torch.tensor(c.logprobs) for c in out.completions]
    learner = learner_logprobs(model, processor, samples[0], out.completions)
    with model.disable_adapter():
        base = learner_logprobs(model, processor, samples[0], out.completions)
    gap = max(float((s - lp).abs().max()) for s, lp in zip(sampler, learner, strict=True))
    assert gap < 1e-5, gap  # float32 both sides (measured 5e-7)
    # the premise: the engine served the adapter (without it, the logprobs are the base model's)
    assert max(float((s - b).abs().max()) for s, b in zip(sampler, base, strict=True)) > 1e-3
    # the vision adapters were served too: after moving them alone, the engine follows the learner, and the learner
    # with the previous vision adapters gives other logprobs on the same tokens
    previous = {n: p.detach().clone() for n, p in lora_params(model, vision=True).items()}
    version = engine.lora_request.lora_int_id
    move_adapters(model, 2, vision=True)
    engine.update_weights(model)
    assert full_syncs == [] and engine.lora_request.lora_int_id == version + 1
    again = engine.generate(samples, 2, sampling)[0]
    sampler = [torch.tensor(c.logprobs) for c in again.completions]
    learner_now = learner_logprobs(model, processor, samples[0], again.completions)
    gap_now = max(float((s - lp).abs().max()) for s, lp in zip(sampler, learner_now, strict=True))
    stale = logprobs_with_vision_adapters(model, processor, samples[0], again.completions, previous)
    vision_effect = max(float((s - lp).abs().max()) for s, lp in zip(sampler, stale, strict=True))
    print(f"adapter sync: {adapter_bytes} bytes vs {engine.full_weight_bytes} full; gaps {gap:.2e} {gap_now:.2e}; "
          f"vision adapters' effect {vision_effect:.2e}")
    assert gap_now < 1e-5 and vision_effect > 1e-3
    type(engine).close(engine)
