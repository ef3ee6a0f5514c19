"""Importing TRL's kernels through r1-mm leaves the environment alone: trl's own import sets
VLLM_LOGGING_LEVEL=ERROR, which a learner's colocated engine and pool servers would inherit (every vLLM
warning silenced; a suite run lost the reload lines a server test reads this way)."""

import os
import subprocess
import sys

PROBE = """
import os
from r1_mm.models.trl_imports import trl_module
trl_module("trl.kernels"); trl_module("trl.trainer.utils"); trl_module("trl.models.utils")
print(os.environ.get("VLLM_LOGGING_LEVEL"))
from trl._compat import _patch_vllm_logging  # what `import trl` ran: it still sets the variable
_patch_vllm_logging()
print(os.environ.get("VLLM_LOGGING_LEVEL"))
"""


def test_trl_imported_through_r1mm_leaves_vllm_logging_as_it_was():
    env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    through_r1mm, trl_itself = out.stdout.strip().splitlines()[-2:]
    assert trl_itself == "ERROR"  # the premise: trl's import-time patch still changes the environment
    assert through_r1mm == "None"


def test_a_users_own_vllm_logging_level_is_kept(monkeypatch):
    from r1_mm.models.trl_imports import trl_module

    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    trl_module("trl.kernels")
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
