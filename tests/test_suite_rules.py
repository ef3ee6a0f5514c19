"""Rules the test suite keeps so that it passes from a fresh clone on a busy machine: no assertion on
wall-clock time (timings live in bench/), and no hypothesis deadline (a per-example time limit)."""

from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import settings

CLOCKS = {"time", "perf_counter", "monotonic", "perf_counter_ns", "monotonic_ns", "time_ns"}


def clock_reads(node: ast.AST) -> list[int]:
    """Lines where ``node`` reads a clock (``time.time()``, ``time.perf_counter()``, ...)."""
    return [n.lineno for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr in CLOCKS and isinstance(n.func.value, ast.Name) and n.func.value.id == "time"]


def test_no_assertion_reads_the_clock():
    found = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Assert):
                found += [f"{path.name}:{line}" for line in clock_reads(node)]
    assert found == [], f"wall-clock assertions (assert the mechanism; time it in bench/): {found}"


def test_hypothesis_has_no_deadline():
    assert settings.default.deadline is None
