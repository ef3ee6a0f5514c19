"""The recipe reference is generated from the fields' help: every field has help, and docs/config.md is
what `r1-mm config --doc` prints today (regenerate it with that command when a field changes)."""

import dataclasses
import typing

from r1_mm.cli import main
from r1_mm.config import RecipeConfig, config_doc, field_help
from r1_mm.config.doc import DOC_COMMAND

from .conftest import REPO


def test_every_field_has_help():
    rows = field_help(RecipeConfig)
    missing = [row.name for row in rows if not row.help.strip()]
    assert not missing, f"fields without metadata={{'help': ...}}: {missing}"
    names = {row.name for row in rows}
    for section, cls in typing.get_type_hints(RecipeConfig).items():  # every section and each of its fields
        assert section in names
        assert {f"{section}.{f.name}" for f in dataclasses.fields(cls)} <= names
    assert "rewards.functions[].name" in names


def test_field_help_rows_carry_type_and_default():
    rows = {row.name: row for row in field_help(RecipeConfig)}
    assert rows["algorithm.grpo.beta"].default == 0.04 and rows["algorithm.grpo.beta"].type == "float"
    assert rows["rollout.top_k"].default is None and rows["rollout.top_k"].type == "int | None"
    assert rows["model.lora_target_modules"].default[0] == "q_proj"
    name, type_, default, help_ = rows["training.seed"]  # a plain tuple as well
    assert (name, type_, default) == ("training.seed", "int", 0) and help_


def test_docs_config_md_is_up_to_date():
    text = (REPO / "docs" / "config.md").read_text()
    assert text.splitlines()[0].startswith("_Generated") and DOC_COMMAND in text.splitlines()[0]
    assert text == config_doc(), f"docs/config.md is stale: regenerate it with `{DOC_COMMAND}`"


def test_config_doc_command_prints_the_reference(capsys):
    assert main(["config", "--doc"]) == 0
    out = capsys.readouterr().out
    assert out == config_doc()
    assert "## `algorithm`" in out and "- `algorithm.grpo.beta` (`float`, default `0.04`): " in out
    assert main(["config"]) == 2  # nothing asked for: the usage, not silence
