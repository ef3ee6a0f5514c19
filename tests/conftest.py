"""Shared fixtures: tiny offline models and synthetic data, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """R1MM_CACHE/tiny_models of the test session (subprocesses get R1MM_CACHE=tiny_cache.parent)."""
    return tmp_path_factory.mktemp("r1mm_cache") / "tiny_models"


@pytest.fixture(scope="session")
def tiny_path(tiny_cache):
    """tiny_path("qwen2_5_vl", small=False) -> folder of a saved tiny model (built once)."""
    from r1_mm.testing.tiny_models import TinySpec, tiny_model_path

    def get(family: str = "qwen2_5_vl", small: bool = False, seed: int = 0) -> Path:
        return tiny_model_path(TinySpec(family=family, small_vocab=small, seed=seed), cache_dir=tiny_cache)

    return get


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict[str, Path]:
    from r1_mm.testing import synthetic

    root = tmp_path_factory.mktemp("synthetic")
    return {
        "counting": synthetic.make_counting_task(root, 8, seed=1),
        "spatial": synthetic.make_spatial_task(root, 6, seed=2),
        "events": synthetic.make_event_video_task(root, 4, seed=3),
        "multi_image": synthetic.make_multi_image_task(root, 4, seed=4),
    }
