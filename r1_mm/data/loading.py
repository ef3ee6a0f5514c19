"""Rows from local files (jsonl, json, parquet, csv, arrow, a ``save_to_disk`` folder, a folder of
data files), any ``datasets.load_dataset`` source, or a ``datasets.Dataset`` passed in; then the
recipe's column mapping and media path templates, so public datasets load without conversion.

Rows stay plain dicts (one per example) so that every column reaches the rewards unchanged. jsonl
and json are read here rather than by ``datasets`` so that a bad line is named by its line number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A data file or row that does not fit the schema; the message names the file and row."""


def _utf8(raw: bytes, where: str) -> str:
    """Text of a data file, or a DataError naming where its bytes are not UTF-8 (not a traceback)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at position {exc.start + 1}); "
                        "re-encode the file as UTF-8") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _utf8(raw, f"{path}:{lineno}")
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
        data = json.loads(_utf8(path.read_bytes(), str(path)))
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


def _read_with_datasets(path: Path, split: str = "train") -> list[dict[str, Any]]:
    import datasets

    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split] if split in ds else ds[next(iter(ds))]
    elif path.is_dir():  # a folder of data files (e.g. a downloaded hub dataset): datasets infers the builder
        ds = datasets.load_dataset(str(path), split=split)
    elif path.suffix.lower() == ".arrow":
        ds = datasets.Dataset.from_file(str(path))
    else:
        ds = datasets.load_dataset(path.suffix.lower().lstrip("."), data_files=str(path), split="train")
    return rows_of(ds)


def rows_of(dataset: Any) -> list[dict[str, Any]]:
    """A ``datasets.Dataset`` (or any iterable of mappings) as plain dicts."""
    return [dict(r) for r in dataset]


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
    elif suffix in (".parquet", ".csv", ".arrow"):
        try:
            rows = _read_with_datasets(path)
        except DataError:
            raise
        except Exception as exc:  # datasets/pyarrow raise many types for unreadable files
            raise DataError(f"{path}: cannot be read as {suffix.lstrip('.')} ({str(exc).splitlines()[0][:300]})") from exc
    else:
        raise DataError(f"{path}: unsupported data format '{suffix}' (use .jsonl, .json, .parquet, .csv, .arrow, "
                        "a datasets folder saved with save_to_disk, or data.dataset_name for any load_dataset source)")
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows[:max_rows] if max_rows is not None else rows


def default_media_root(path: str | Path) -> Path:
    """Relative media paths resolve against the data file's folder unless the recipe says otherwise."""
    path = Path(path).expanduser().resolve()
    return path if path.is_dir() else path.parent


def media_root(data_cfg: Any, default_root: Path | None) -> Path | None:
    """Where relative media paths resolve: ``data.media_root`` when set, else the split's default."""
    return Path(data_cfg.media_root).expanduser() if data_cfg.media_root else default_root


# ----------------------------------------------------------------------------------------------
# One split of the recipe's data, mapped to r1-mm's columns


def source_name(data_cfg: Any, split: str = "train") -> str:
    """How errors name the data: the file, or the load_dataset source and split."""
    if data_cfg.dataset_name:
        return f"{data_cfg.dataset_name}[{_split_name(data_cfg, split)}]"
    return str(data_cfg.train_path if split == "train" else data_cfg.eval_path)


def _split_name(data_cfg: Any, split: str) -> str:
    return data_cfg.train_split if split == "train" else (data_cfg.eval_split or "")


def has_split(data_cfg: Any, split: str) -> bool:
    if split == "train":
        return bool(data_cfg.dataset_name or data_cfg.train_path)
    return bool(data_cfg.eval_split if data_cfg.dataset_name else data_cfg.eval_path)


def load_from_hub_or_builder(data_cfg: Any, split: str) -> list[dict[str, Any]]:
    import datasets

    name = _split_name(data_cfg, split)
    try:
        ds = datasets.load_dataset(data_cfg.dataset_name, data_cfg.dataset_config, split=name,
                                   data_files=data_cfg.data_files)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        raise DataError(f"data.dataset_name '{data_cfg.dataset_name}' (split '{name}'): "
                        f"{str(exc).splitlines()[0][:300]}") from exc
    return rows_of(ds)


def map_columns(rows: list[dict[str, Any]], data_cfg: Any, source: str) -> list[dict[str, Any]]:
    """``data.columns`` renames, then ``data.media_template`` builds media paths from row fields."""
    mapping, templates = data_cfg.columns, data_cfg.media_template
    if not mapping and not templates:
        return rows
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        for old, new in mapping.items():
            if old not in row:
                continue
            if new in row and new not in mapping:
                raise DataError(f"{source}: row {i} (id {row.get('id', i)}): data.columns maps '{old}' to '{new}', "
                                f"but the row already has a '{new}' column; map or drop one of them")
            row[new] = row.pop(old)
        for column, template in templates.items():
            try:
                row[column] = template.format(**row)
            except KeyError as exc:
                raise DataError(f"{source}: row {i} (id {row.get('id', i)}): data.media_template.{column} "
                                f"'{template}' needs the field {exc}, which the row does not have "
                                f"(fields: {', '.join(sorted(row))})") from exc
        out.append(row)
    return out


def load_split(data_cfg: Any, split: str = "train", *, path: str | Path | None = None,
               dataset: Any = None) -> tuple[list[dict[str, Any]], str, Path | None]:
    """(rows, name for errors, default media root) of the train or eval split.

    ``dataset``: rows given as an object (a ``datasets.Dataset``, a list of dicts: the Python API);
    ``path``: a file that overrides the recipe's."""
    if dataset is not None:
        rows, source, root = rows_of(dataset), f"<{type(dataset).__name__} of {split}>", None
    elif path is not None or not data_cfg.dataset_name:
        path = path or (data_cfg.train_path if split == "train" else data_cfg.eval_path)
        if not path:
            raise DataError(f"data.{'train' if split == 'train' else 'eval'}_path is empty: set it (a file) or "
                            "data.dataset_name (any datasets.load_dataset source)")
        rows, source, root = read_rows(path), str(path), default_media_root(path)
    else:
        rows, source = load_from_hub_or_builder(data_cfg, split), source_name(data_cfg, split)
        local = Path(data_cfg.dataset_name).expanduser()
        root = local.resolve() if local.is_dir() else None  # a downloaded dataset folder holds its media
    if not rows:
        raise DataError(f"{source}: no rows")
    if data_cfg.max_rows is not None:
        rows = rows[: data_cfg.max_rows]
    return map_columns(rows, data_cfg, source), source, root
