"""Every command's --help exits 0 and explains each of its arguments; commands that take a recipe say
how overrides are spelt and where the fields are documented."""

import re

import pytest

from r1_mm.cli import COMMANDS, main

# every command, and the sub-commands whose own --help is a different parser
HELP_COMMANDS = [[name] for name in COMMANDS] + [
    ["rewards", "list"], ["rewards", "check"], ["tools", "list"], ["tools", "check"], ["dpo", "precompute-ref"], ["tpo", "build"], ["serve", "rollout"],
    ["eval", "--lmms-eval", "x"],
]
TAKES_A_RECIPE = [["train"], ["launch"], ["rollout"], ["demo"], ["sweep"], ["eval"], ["plan"], ["dpo", "precompute-ref"],
                  ["tpo", "build"]]


def arguments_without_help(text: str) -> list[str]:
    """The argument lines of an argparse help text that carry no help: an argument starts at indent 2 (4 for
    a sub-command) and its help follows on the same line after two spaces, or on the next, deeper line."""
    missing, in_section = [], False
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith(" "):  # a section title ("options:"), the description or the epilog
            in_section = line.endswith(":") and not line.startswith("usage:")
            continue
        indent = len(line) - len(line.lstrip())
        if not in_section or not line.strip() or indent > 4:
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        same_line = re.match(r"^\s+\S.*?\s{2,}\S", line)
        next_line = following.strip() and len(following) - len(following.lstrip()) > 4
        if not (same_line or next_line):
            missing.append(line.strip())
    return missing


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0, argv
    return capsys.readouterr().out


def test_the_checker_finds_an_argument_without_help():
    text = "usage: x\n\noptions:\n  -h, --help  show this\n  --rows ROWS\n  --seed SEED\n                 the seed\n"
    assert arguments_without_help(text) == ["--rows ROWS"]


@pytest.mark.parametrize("argv", HELP_COMMANDS, ids=" ".join)
def test_every_argument_has_help(argv, capsys):
    text = help_text(argv, capsys)
    assert text.startswith("usage: r1-mm"), text
    assert arguments_without_help(text) == [], f"r1-mm {' '.join(argv)} --help"


@pytest.mark.parametrize("argv", TAKES_A_RECIPE, ids=" ".join)
def test_recipe_commands_explain_overrides(argv, capsys):
    text = " ".join(help_text(argv, capsys).split())  # argparse wraps the epilog
    assert "section.field=value" in text and "r1-mm config --doc" in text
