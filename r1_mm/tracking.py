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
        """``resume=False`` starts a new metrics file; a resumed run appends to the existing one (which
        the trainer has truncated to its checkpoint, see ``run_folder.truncate_logs``)."""
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

    def log_completions_table(self, rows: list[dict[str, Any]], step: int) -> None:
        """A W&B table of sample completions, with the prompt's image or a strip of its sampled frames."""
        if not self.enabled or self.wandb_run is None or not rows:
            return
        import wandb

        columns = ["step", "row_id", "media", "prompt", "completion", "solution", "reward", "advantage"]
        table = wandb.Table(columns=columns)
        for r in rows:
            media = wandb.Image(r["media"]) if r.get("media") is not None else None
            table.add_data(step, r["row_id"], media, r["prompt"], r["completion"], str(r.get("solution")),
                           r["reward"], r["advantage"])
        self.wandb_run.log({"completions": table}, step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def media_preview(sample: Any, max_frames: int = 4) -> Any:
    """The prompt's first image, or a strip of up to ``max_frames`` evenly spaced video frames (PIL)."""
    import numpy as np
    from PIL import Image

    if getattr(sample, "images", None):
        return sample.images[0]
    if getattr(sample, "videos", None):
        frames = sample.videos[0].frames
        pick = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).astype(int)
        return Image.fromarray(np.concatenate([frames[i] for i in pick], axis=1))
    return None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
