"""Importing TRL's kernels through r1-mm leaves the environment alone: trl's own import sets
VLLM_LOGGING_LEVEL=ERROR, which a learner's colocated engine and pool servers would inherit (every vLLM
warning silenced; a suite run lost the reload lines a server test reads this way)."""

import subprocess
import sys

PROBE = """
import os, sys
os.environ.pop("VLLM_LOGGING_LEVEL", None)
if sys.argv[1] == "plain":
    import trl.kernels
else:
    from r1_mm.trainers.trl_imports import trl_module
    trl_module("trl.kernels"); trl_module("trl.trainer.utils"); trl_module("trl.models.utils")
print(os.environ.get("VLLM_LOGGING_LEVEL"))
"""


def probe(how: str, env_level: str | None = None) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"}
    out = subprocess.run([sys.executable, "-c", PROBE, how], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_trl_imported_through_r1mm_leaves_vllm_logging_as_it_was():
    assert probe("plain") == "ERROR"  # the premise: trl itself still changes the environment
    assert probe("r1mm") == "None"


def test_a_users_own_vllm_logging_level_is_kept(monkeypatch):
    import os

    from r1_mm.trainers.trl_imports import trl_module

    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    trl_module("trl.kernels")
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
