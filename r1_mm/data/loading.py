"""Read rows from local files: jsonl, json, parquet, or a folder written by ``datasets.save_to_disk``.

Rows stay plain dicts (one per example) so that every column reaches the rewards unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A data file or row that does not fit the schema; the message names the file and row."""


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: a row must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of rows (or {{'data': [...]}})")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i} must be an object, got {type(row).__name__}")
    return data


def _read_with_datasets(path: Path) -> list[dict[str, Any]]:
    import datasets

    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else next(iter(ds))
            ds = ds[split]
    else:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    return [dict(r) for r in ds]


def read_rows(path: str | Path, max_rows: int | None = None) -> list[dict[str, Any]]:
    """Load all rows of a local data file or saved dataset folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if path.is_dir():
        rows = _read_with_datasets(path)
    elif suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix == ".parquet":
        rows = _read_with_datasets(path)
    else:
        raise DataError(f"{path}: unsupported data format '{suffix}' (use .jsonl, .json, .parquet or a "
                        "datasets folder saved with save_to_disk)")
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows[:max_rows] if max_rows is not None else rows


def default_media_root(path: str | Path) -> Path:
    """Relative media paths resolve against the data file's folder unless the recipe says otherwise."""
    path = Path(path).expanduser().resolve()
    return path if path.is_dir() else path.parent
