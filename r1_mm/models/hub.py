"""A model's config.json, read in seconds or refused in one line when the model hub cannot be reached.

Why not plain ``AutoConfig.from_pretrained``: for a hub id that is not in the local cache, with no
network, huggingface_hub retries each request five times with backoff (about 25 s) and transformers
then raises a chained traceback; with HF_HUB_OFFLINE=1 it fails at once, but still as a traceback.
``r1-mm plan`` and the preflight before a run read only the config, so here a cached config is read
from the cache without asking the hub, and an uncached one is preceded by one request, without
retries, that tells an unreachable hub apart from a missing or private model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from r1_mm.config.recipe import ConfigError, ModelConfig

PROBE_TIMEOUT_S = 5.0


def _hub_id(name: str) -> bool:
    """Is ``name`` something the hub would be asked about (not a local folder, a valid repo id)?"""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def unreachable(repo_id: str) -> str | None:
    """Why the hub cannot serve ``repo_id`` now (offline mode, or no connection), or None."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "it is not in the local cache and HF_HUB_OFFLINE=1"
    url = f"{constants.ENDPOINT}/api/models/{repo_id}"
    try:
        get_session().head(url, timeout=PROBE_TIMEOUT_S, follow_redirects=True)
    except Exception as exc:  # any transport failure (refused, DNS, timeout, proxy) means: not reachable
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"it is not in the local cache and {constants.ENDPOINT} cannot be reached ({reason})"
    return None


def read_model_config(model: ModelConfig) -> Any:
    """The model's transformers config; a ConfigError (one line, naming model.name_or_path) otherwise."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoConfig

    from r1_mm.models.loading import resolve_model_path

    name = resolve_model_path(model)
    local_only = False
    if _hub_id(name):
        local_only = isinstance(try_to_load_from_cache(name, "config.json"), str)
        problem = None if local_only else unreachable(name)
        if problem:
            raise ConfigError(f"model.name_or_path '{model.name_or_path}' cannot be reached: {problem}; download it "
                              "(hf download) or give a local model folder")
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=model.trust_remote_code, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.name_or_path '{model.name_or_path}': its config.json cannot be read ({first}); give "
                          "a local model folder, a hub id (cached, when offline) or tiny:<family>") from None
