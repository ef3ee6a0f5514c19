"""r1-mm: RL post-training for image and video language models.

The Python API, for notebooks and scripts::

    from r1_mm import GRPOTrainer, RecipeConfig, load_recipe
    trainer = GRPOTrainer(load_recipe("recipe.yaml"), model=model, processor=processor,
                          train_dataset=dataset, reward_funcs=[my_reward])
    trainer.train()

Names are resolved on first use, so ``import r1_mm`` stays light (the command line imports it first).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RecipeConfig": "r1_mm.config.recipe",
    "load_recipe": "r1_mm.config.recipe",
    "ConfigError": "r1_mm.config.recipe",
    "GRPOTrainer": "r1_mm.trainers.grpo",
    "DPOTrainer": "r1_mm.trainers.preference",
    "TPOTrainer": "r1_mm.trainers.preference",
    "IterativeDPOTrainer": "r1_mm.trainers.iterative_dpo",
    "SFTTrainer": "r1_mm.trainers.sft",
    "reward": "r1_mm.rewards.registry",
}
_ALIASES = {"DPOTrainer": "PreferenceTrainer", "TPOTrainer": "PreferenceTrainer"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'r1_mm' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
