"""LoRA on the vision tower and projector (model.lora_vision), and adapter-only weight sync to the colocated vLLM
engine (rollout.weight_sync_lora=adapter): vLLM serves the PEFT adapter as a LoRA over the base weights it loaded
once, and the sampler's logprobs equal the learner's."""

from __future__ import annotations

import pytest
import torch

from r1_mm.config.recipe import ConfigError, ModelConfig, load_recipe
from r1_mm.models.families.base import UnsupportedModelError
from r1_mm.models.forward.grouped import grouped_logprobs, pack_groups
from r1_mm.models.loading import apply_lora, vision_modules

from .test_grouped_forward import G, compare, completions, load, prompts_for

VISION = ("visual", "vision_tower", "vision_model", "multi_modal_projector")


def lora_params(model, vision: bool) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n and any(v in n for v in VISION) == vision}


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


def test_vision_lora_is_refused_for_families_without_targets(tiny_path):
    model, _ = load(tiny_path, "gemma3")
    with pytest.raises(UnsupportedModelError, match="lora_vision.*gemma3"):
        apply_lora(model, ModelConfig(lora=True, lora_vision=True))


def test_adapter_sync_needs_lora_and_the_colocated_engine():
    with pytest.raises(ConfigError, match="weight_sync_lora=adapter"):
        load_recipe(None, ["rollout.engine=vllm_colocate", "rollout.weight_sync_lora=adapter"])
    with pytest.raises(ConfigError, match="weight_sync_lora=adapter"):
        load_recipe(None, ["rollout.engine=vllm_pool", "model.lora=true", "rollout.weight_sync_lora=adapter"])
    with pytest.raises(ConfigError, match="lora_vision"):
        load_recipe(None, ["model.lora_vision=true"])
