"""The family registry: one module per model_type, README's table generated from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1_mm.models.families import FAMILIES, UnsupportedModelError, family_of, get_family
from r1_mm.models.families.base import CAPABILITIES, ModelFamily
from r1_mm.models.families.table import support_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_is_the_generated_one():
    assert support_table() in (ROOT / "README.md").read_text(), (
        "README.md's families table is stale: paste r1_mm.models.families.table.support_table()")


def test_every_family_states_every_capability_and_builds_by_its_name():
    for name in FAMILIES.names():
        family = get_family(name)
        assert family.model_type == name and set(family.support) == set(CAPABILITIES)
        assert (ROOT / "r1_mm" / "models" / "families" / f"{name}.py").exists()  # one module per family
    with pytest.raises(ValueError, match="must state every capability"):
        ModelFamily(model_type="x", display_name="X", build_tiny=lambda s, t: (None, None), chat_template="",
                    support={"grouped": "tested"})


def test_unknown_model_type_is_refused_with_a_suggestion():
    class Config:
        model_type = "qwen3_vl_mo"

    with pytest.raises(UnsupportedModelError, match="did you mean 'qwen3_vl'"):
        family_of(Config())
