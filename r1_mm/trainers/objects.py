"""What the Python API can pass as objects instead of names in the recipe.

A notebook user holds a model, a processor, a ``datasets.Dataset`` and reward functions as Python
objects; the recipe then only says how to train. Objects and names mix: a recipe's named rewards are
kept, the given callables are added (registered under their names so that every check, log line and
metric names them as the built-ins are named).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1_mm.config.recipe import ConfigError, RecipeConfig, RewardSpec, load_recipe, validate


@dataclass
class RunObjects:
    model: Any = None  # a transformers image-text-to-text model (its config replaces config.json checks)
    processor: Any = None  # its processor
    train_dataset: Any = None  # a datasets.Dataset or a list of row dicts (instead of data.train_path)
    eval_dataset: Any = None
    reward_funcs: Any = None  # callables, or {name: callable}, added to rewards.functions (weight 1)


def as_recipe(recipe: RecipeConfig | dict[str, Any] | str | Path | None) -> RecipeConfig:
    """A RecipeConfig as given, a dict of recipe sections, or a recipe YAML's path."""
    if isinstance(recipe, RecipeConfig):
        return validate(recipe)
    if recipe is None:
        return load_recipe(None)
    if isinstance(recipe, dict):
        return RecipeConfig.from_dict(recipe)
    return load_recipe(recipe)


def _named(reward_funcs: Any) -> list[tuple[str, Callable[..., Any]]]:
    if reward_funcs is None:
        return []
    items = list(reward_funcs.items()) if isinstance(reward_funcs, dict) else \
        [(getattr(fn, "__name__", None), fn) for fn in (reward_funcs if isinstance(reward_funcs, (list, tuple))
                                                         else [reward_funcs])]
    for name, fn in items:
        if not callable(fn):
            raise ConfigError(f"reward_funcs: {name or fn!r} is not callable")
        if not name or name == "<lambda>":
            raise ConfigError("reward_funcs: a reward without a name (a lambda?): pass {name: function}")
    return items


def with_objects(recipe: Any, objects: RunObjects) -> RecipeConfig:
    """The recipe, with given reward callables registered and appended to rewards.functions."""
    from r1_mm.core.registry import DuplicateNameError
    from r1_mm.rewards.registry import register_object

    cfg = as_recipe(recipe)
    specs = list(cfg.rewards.functions)
    for name, fn in _named(objects.reward_funcs):
        try:  # an object given again under its name (a notebook cell run again) replaces the earlier one
            register_object(name, fn)
        except DuplicateNameError as exc:
            raise ConfigError(f"reward_funcs: {exc}; pass {{'another_name': {getattr(fn, '__name__', 'fn')}}}") from None
        if not any(s.name == name for s in specs):
            specs.append(RewardSpec(name=name))
    return dataclasses.replace(cfg, rewards=dataclasses.replace(cfg.rewards, functions=specs))
