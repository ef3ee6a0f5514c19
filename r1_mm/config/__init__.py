"""The recipe schema and its checks (:mod:`r1_mm.config.recipe`); the video budget rule the recipe is
checked against (:mod:`r1_mm.config.visual_budget`). The names recipes and notebooks use are handed on here."""

from r1_mm.config.recipe import ConfigError, RecipeConfig, dump_recipe, load_recipe

__all__ = ["ConfigError", "RecipeConfig", "dump_recipe", "load_recipe"]
