"""``r1-mm eval --lmms-eval TASKS``: a checkpoint's exported ``model/`` scored by lmms-eval, the LMMs-Lab
evaluation harness, with its own tasks and metrics (nothing here re-implements a benchmark).

lmms-eval runs in ``.venv-eval`` (scripts/setup_eval.sh), a venv layered on the training one: its
pins (antlr4 4.7.2, hence math-verify 0.1.0; av 15) would break the training stack's rewards and
video decoding, so it runs as a command of its own and hands back its results file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1_mm.config.recipe import ConfigError

# transformers model_type -> lmms-eval model name (its registry); --lmms-model overrides
LMMS_MODELS = {"qwen2_5_vl": "qwen2_5_vl", "qwen2_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl",
               "llava_onevision": "llava_onevision", "llava": "llava_hf", "idefics3": "idefics2", "gemma3": "gemma3"}


@dataclass
class LmmsEvalRun:
    model_dir: Path
    tasks: str
    output_dir: Path
    include_path: str | None = None
    limit: float | None = None
    lmms_model: str | None = None
    batch_size: int = 1
    extra: tuple[str, ...] = ()


def eval_python() -> Path:
    """The interpreter of .venv-eval (beside this environment), or R1MM_EVAL_PYTHON."""
    import os

    given = os.environ.get("R1MM_EVAL_PYTHON")
    candidate = Path(given) if given else Path(sys.prefix).parent / ".venv-eval" / "bin" / "python"
    if not candidate.exists():
        raise ConfigError(f"lmms-eval is not installed ({candidate} is missing): run bash scripts/setup_eval.sh "
                          "(it lives in its own environment, its pins conflict with the training stack's)")
    return candidate


def model_folder(path: str | Path) -> Path:
    """A checkpoint (its model/ export) or a transformers model folder."""
    path = Path(path)
    folder = path / "model" if (path / "model" / "config.json").exists() else path
    if not (folder / "config.json").exists():
        raise ConfigError(f"--checkpoint {path}: no config.json in it or in its model/ folder; give "
                          "RUN/checkpoints/step-N or a model folder")
    return folder


def lmms_model_name(folder: Path, override: str | None) -> str:
    if override:
        return override
    model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
    if model_type not in LMMS_MODELS:
        raise ConfigError(f"no lmms-eval model known for model_type '{model_type}': pass --lmms-model NAME "
                          f"(known: {', '.join(sorted(LMMS_MODELS))})")
    return LMMS_MODELS[model_type]


def command(run: LmmsEvalRun) -> list[str]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_args = f"pretrained={run.model_dir},device_map={'auto' if device == 'cuda' else 'cpu'}"
    cmd = [str(eval_python()), "-m", "lmms_eval", "--model", lmms_model_name(run.model_dir, run.lmms_model),
           "--model_args", model_args, "--tasks", run.tasks, "--batch_size", str(run.batch_size),
           "--device", device, "--output_path", str(run.output_dir)]
    if run.include_path:
        cmd += ["--include_path", str(run.include_path)]
    if run.limit is not None:
        cmd += ["--limit", f"{run.limit:g}"]
    return [*cmd, *run.extra]


def newest_results(output_dir: Path) -> Path:
    found = sorted(output_dir.rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"lmms-eval wrote no *_results.json under {output_dir}")
    return found[-1]


def run_lmms_eval(run: LmmsEvalRun) -> dict[str, Any]:
    """Runs lmms-eval; returns {"results": {task: {metric: value}}, "results_file", "model_dir", ...}."""
    run.output_dir.mkdir(parents=True, exist_ok=True)
    cmd = command(run)
    log = run.output_dir / "lmms_eval.log"
    with log.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"lmms-eval failed (exit {proc.returncode}); log {log}:\n{tail}")
    results_file = newest_results(run.output_dir)
    data = json.loads(results_file.read_text())
    summary = {"model_dir": str(run.model_dir), "tasks": run.tasks, "results_file": str(results_file),
               "results": {task: {k: v for k, v in metrics.items() if k != "alias"}
                           for task, metrics in data.get("results", {}).items()},
               "n_samples": data.get("n-samples", {}), "command": cmd}
    (run.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
