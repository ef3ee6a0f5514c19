"""The recipe reference, generated from the schema's field metadata.

Why generated: the help text lives once, on each field (``dataclasses.field(metadata={"help": ...})``,
as TRL documents its configs), and ``r1-mm config --doc``, ``docs/config.md`` and the commands'
``--help`` epilogs all read it from there, so the reference cannot drift from the schema (a test
regenerates ``docs/config.md`` and fails when it differs).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, NamedTuple

from r1_mm.config.recipe import RecipeConfig

DOC_COMMAND = "r1-mm config --doc > docs/config.md"

# the epilog of every command that takes a recipe: how overrides are spelt and where the fields are listed
OVERRIDES_EPILOG = ("Overrides are section.field=value (e.g. algorithm.grpo.beta=0.0 or rollout.temperature=0.7; the "
                    "value is parsed as YAML) and apply on top of the recipe. `r1-mm config --doc` lists every "
                    "section and field with its type, default and help (also in docs/config.md).")


class FieldHelp(NamedTuple):
    """One documented field: its dotted path in a recipe, its annotation, its default and its help."""

    name: str
    type: str
    default: Any
    help: str


def _nested(tp: Any) -> tuple[type | None, str]:
    """The dataclass a field holds (directly, or as list items) and the path suffix its fields get."""
    if dataclasses.is_dataclass(tp):
        return tp, "."
    if typing.get_origin(tp) is list and typing.get_args(tp) and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return typing.get_args(tp)[0], "[]."
    return None, ""


def field_help(cls: type, prefix: str = "") -> list[FieldHelp]:
    """Every field of ``cls`` and of the dataclasses it holds, depth first, as (dotted name, type, default,
    help). A section's own row comes before its fields; items of a list of dataclasses are spelt
    ``rewards.functions[].name``. A field without help gets ``help=""`` (the doc test refuses that)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        spelt = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        name = f"{prefix}{f.name}"
        rows.append(FieldHelp(name, spelt, default, str(f.metadata.get("help", ""))))
        inner, join = _nested(hints[f.name])
        if inner is not None:
            rows += field_help(inner, f"{name}{join}")
    return rows


def _yaml_value(value: Any) -> str:
    """A default as it would be written in a recipe (JSON is YAML's flow style)."""
    return json.dumps(value, default=repr)


def config_doc() -> str:
    """The recipe reference in markdown: one heading per section, one line per field."""
    lines = ["_Generated from the field help in `r1_mm/config/recipe.py` by "
             f"`{DOC_COMMAND}`; edit the help there, not this file._", "",
             "# Recipe reference", "",
             "A recipe is one YAML file with the sections below (`extends: other.yaml` starts from another recipe). "
             "Any field can be overridden on the command line as `section.field=value` (the value is parsed as "
             "YAML), e.g. `r1-mm train RECIPE.yaml algorithm.grpo.beta=0.0 rollout.temperature=0.7`. "
             "Unknown keys and wrong types stop the run with the field's name and the closest valid one."]
    for row in field_help(RecipeConfig):
        if "." not in row.name:  # a top-level section
            lines += ["", f"## `{row.name}`", "", row.help[:1].upper() + row.help[1:] + ".", ""]
        elif dataclasses.is_dataclass(row.default):  # a section inside a section: its fields follow
            lines.append(f"- `{row.name}` (`{row.type}`): {row.help}")
        else:
            lines.append(f"- `{row.name}` (`{row.type}`, default `{_yaml_value(row.default)}`): {row.help}")
    return "\n".join(lines) + "\n"
