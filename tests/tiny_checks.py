"""Checks every family's tests make of its tiny model (shared so each family file states only what is its own)."""

import hashlib
from pathlib import Path

from r1_mm.models.tiny import TinySpec, build_tiny_model


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def built_twice_identically(tmp_path: Path, family: str) -> Path:
    """Build the family's tiny model twice from one seed: weights and tokenizer byte-identical (that another
    seed gives other weights is the builder's, tested once in test_tiny_models). Returns the first build."""
    a = build_tiny_model(tmp_path / "a", TinySpec(family=family, seed=3))
    b = build_tiny_model(tmp_path / "b", TinySpec(family=family, seed=3))
    assert digest(a) == digest(b)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    return a
