"""The recipe schema and its checks (:mod:`r1_mm.config.recipe`); the video budget rule the recipe is
checked against (:mod:`r1_mm.config.visual_budget`); the reference generated from the fields' help
(:mod:`r1_mm.config.doc`). The names recipes and notebooks use are handed on here."""

from r1_mm.config.doc import FieldHelp, config_doc, field_help
from r1_mm.config.recipe import ConfigError, RecipeConfig, dump_recipe, load_recipe

__all__ = ["ConfigError", "FieldHelp", "RecipeConfig", "config_doc", "dump_recipe", "field_help", "load_recipe"]
