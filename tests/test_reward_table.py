"""The built-in rewards against a table of cases from the public reward implementations and their tests.

tests/data/reward_cases.jsonl holds one case per line: the reward, the completion it scores
(``prediction``), the ``solution``, r1-mm's ``expected`` score, the ``source`` (repository, file and
function or test) and what that source scores (``source_says``). Where the two differ, ``note`` says
why r1-mm differs on purpose; a row without a note agrees with its source. Optional: ``options`` (the
mcq column) and ``kwargs`` (reward arguments). A fix that moves a bug (LaTeX parsing that made words
equal their anagrams) fails here, on negatives as well as positives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from r1_mm.rewards import get

CASES = Path(__file__).parent / "data" / "reward_cases.jsonl"
COLUMNS = {"reward", "prediction", "solution", "expected", "source", "source_says", "note"}
OPTIONAL = {"options", "kwargs"}
SOURCES_REQUIRED = {"hiyouga/EasyR1", "om-ai-lab/VLM-R1", "tulerfeng/Video-R1", "huggingface/open-r1",
                    "huggingface/Math-Verify"}


def load_cases() -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for every non-empty line of the table."""
    rows = []
    for n, line in enumerate(CASES.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{CASES}:{n}: not a JSON object: {exc}") from None
    return rows


ROWS = load_cases()


def test_table_covers_the_sources_and_says_where_it_differs():
    assert len(ROWS) >= 200
    assert SOURCES_REQUIRED <= {row["source"].split()[0] for _, row in ROWS}
    assert sum(row["expected"] == 0.0 for _, row in ROWS) >= 60  # negatives as well as positives
    assert sum(row["expected"] == 1.0 for _, row in ROWS) >= 60
    for line, row in ROWS:
        assert COLUMNS <= set(row) <= COLUMNS | OPTIONAL, f"line {line}: columns {sorted(row)}"
        assert 0.0 <= row["expected"] <= 1.0 and row["source"].strip(), f"line {line}"
        agrees = row["source_says"] is not None and abs(row["source_says"] - row["expected"]) < 1e-6
        assert agrees != bool(row["note"].strip()), \
            f"line {line}: a row that differs from its source needs a note, and only such a row has one"


@pytest.mark.parametrize(("line", "row"), ROWS, ids=[f"L{n}-{r['reward']}" for n, r in ROWS])
def test_reward_scores_the_table_case(line, row):
    fn = get(row["reward"])
    assert fn.__module__.startswith("r1_mm.rewards."), "the table tests r1-mm's own rewards"
    columns: dict[str, list[Any]] = {"solution": [row["solution"]]}
    if "options" in row:
        columns["options"] = [row["options"]]
    got = fn(completions=[row["prediction"]], prompts=[""], completion_ids=[[0]], **columns, **row.get("kwargs", {}))
    assert got[0] is not None and got[0] == pytest.approx(row["expected"], abs=1e-6), (
        f"line {line}: {row['reward']}({row['prediction']!r}, solution={row['solution']!r}) = {got[0]}, "
        f"table says {row['expected']} (source: {row['source']}; {row['note'] or 'agrees with the source'})")
