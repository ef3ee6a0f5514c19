"""Metrics: always a local ``metrics.jsonl``; W&B too when ``logging.report_to`` includes it.

The jsonl file is the source of truth for plots and tests; W&B is a mirror for dashboards.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from r1_mm.config import RecipeConfig


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    def __init__(self, cfg: RecipeConfig, run_dir: str | Path, *, is_main_process: bool = True,
                 resume: bool = False):
        """``resume=False`` starts a new metrics file; a resumed run appends to the existing one."""
        self.run_dir = Path(run_dir)
        self.enabled = is_main_process
        self.path = self.run_dir / "metrics.jsonl"
        self.wandb_run = None
        self._start = time.time()
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            self.path.unlink(missing_ok=True)
        if "wandb" in cfg.logging.report_to:
            import wandb

            self.wandb_run = wandb.init(project=cfg.logging.project, name=cfg.logging.run_name,
                                        group=cfg.logging.group, config=cfg.to_dict(), dir=str(self.run_dir))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self._start, 3)}
        record.update({k: _clean(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
