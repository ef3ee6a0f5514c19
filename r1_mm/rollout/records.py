"""Rows of a run's ``completions.jsonl``: what the policy wrote, for which prompt, and how it scored.

One row per completion (``pandas.read_json(path, lines=True)`` gives a table; the rows of one group
share ``step`` and ``group``). Every row: ``step``, ``row_id``, ``problem_type``, ``prompt`` (the user's
text), ``solution``, ``completion``, ``tokens``, ``truncated``; a training run adds ``group``,
``rewards`` (each reward function's value by metric name, null = not applicable), ``reward`` (the
weighted total, with any shaping bonus) and ``advantage``. Why every group and not a sample of one:
reading why a problem type's reward moves needs its groups, all of them (``logging.completions_sample_rate``
thins them for big runs).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from r1_mm.rewards.critic.reward import question_text
from r1_mm.rollout.batch import RolloutBatch


def _number(value: float) -> float | None:
    """JSON has no NaN: a reward that did not apply is null."""
    value = float(value)
    return value if math.isfinite(value) else None


def completion_record(sample: Any, completion: Any, image_dir: Path | None = None, key: str = "") -> dict[str, Any]:
    """The prompt and completion columns every completions.jsonl row has (training and rollout jobs). A tool
    trajectory adds ``trajectory`` (its calls with their arguments, status and result text, model turns, why it
    stopped) and, with ``image_dir``, ``tool_images``: the images the tools showed the model, written there as
    PNG files named by ``key`` (paths relative to the image folder's parent, the run folder)."""
    record = {"row_id": sample.row_id, "problem_type": sample.row.get("problem_type"),
              "prompt": question_text(sample.messages), "solution": sample.row.get("solution"),
              "completion": completion.text, "tokens": len(completion.token_ids), "truncated": completion.truncated}
    trajectory = getattr(completion, "trajectory", None)
    if trajectory is not None:
        record["trajectory"] = trajectory.to_dict()
        if image_dir is not None:
            image_dir.mkdir(parents=True, exist_ok=True)
            paths = []
            for k, image in enumerate(im for turn in trajectory.turns for im in turn.images):
                path = image_dir / f"{key}-{k}.png"
                image.save(path)
                paths.append(str(path.relative_to(image_dir.parent)))
            record["tool_images"] = paths
    return record


def sampled_groups(n_groups: int, rate: float, seed: int) -> list[int]:
    """The groups to log: all at rate 1, none at 0, otherwise each with probability ``rate`` from a
    generator seeded by ``seed`` (derived from run seed, step, rank), so a resumed run logs the same groups."""
    if rate >= 1.0:
        return list(range(n_groups))
    rng = random.Random(seed)
    return [i for i in range(n_groups) if rng.random() < rate]


def scored_rows(step: int, batch: RolloutBatch, per_function: Any, total: Any, advantages: Any,
                labels: Sequence[str], groups: Sequence[int], image_dir: Path | None = None) -> list[dict]:
    """Rows of the chosen ``groups`` (prompt positions in ``batch``) of a step, one per completion of
    each, with the completion's group id (numbered across the step's processes) as ``group``; a tool
    trajectory's images go to ``image_dir`` (see :func:`completion_record`)."""
    rows = []
    for i in groups:
        span = batch.rows(i)
        for j in range(span.start, span.stop):
            group = int(batch.group_ids[j])
            completion = batch.completions[j]
            rows.append({"step": step, "group": group, "policy_version": int(batch.policy_version[j]),
                         **completion_record(batch.samples[i], completion, image_dir,
                                             key=f"step{step}-group{group}-{j - span.start}"),
                         **({"token_versions": completion.token_versions} if completion.token_versions else {}),
                         "rewards": {label: _number(per_function[j, k]) for k, label in enumerate(labels)},
                         "reward": _number(total[j]), "advantage": _number(advantages[j])})
    return rows


def append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
