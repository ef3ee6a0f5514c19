"""TRL's modules, imported so that TRL leaves the process environment as it found it.

Why: the first ``import trl`` sets ``VLLM_LOGGING_LEVEL=ERROR`` in ``os.environ`` unless it is set
already (``trl/_compat.py``, ``_patch_vllm_logging``). In a learner that silenced vLLM below ERROR in
its colocated engine and in every pool server it starts (they inherit the environment): the weight
reload warnings, the engine's sizing and memory lines, everything a user reads when a run misbehaves.
r1-mm uses a few of TRL's kernels and DeepSpeed helpers, not its logging policy, so the variable is put
back to what it was (absent, or the user's own value) after the import.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

TRL_SET_VARIABLES = ("VLLM_LOGGING_LEVEL",)


def trl_module(name: str) -> ModuleType:
    """``importlib.import_module(name)`` for a module of trl, without trl's changes to the environment."""
    before = {key: os.environ.get(key) for key in TRL_SET_VARIABLES}
    try:
        return importlib.import_module(name)
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
