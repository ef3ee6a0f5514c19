"""Metrics: always a local ``metrics.jsonl``; any of accelerate's trackers too (``logging.report_to``).

The jsonl file is the source of truth for plots and tests; trackers are mirrors for dashboards.
Trackers are accelerate's own classes (W&B, TensorBoard, MLflow, Comet, Aim, ClearML, DVCLive,
SwanLab, Trackio) or a plugin (``my_tracker.py:MyTracker``, a ``accelerate.tracking.GeneralTracker``
subclass). Why not ``Accelerator(log_with=...)``: the trackers start after the run folder is claimed
(a refused run must not open a W&B run), the rollout job logs without an Accelerator, and a resumed
run passes its run id so W&B continues the same run; the start-up below is accelerate's
``init_trackers`` with those three differences.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import time
from pathlib import Path
from typing import Any

from r1_mm.config.recipe import ConfigError, RecipeConfig
from r1_mm.core.plugins import PluginError, is_plugin_name, load_object
from r1_mm.core.registry import Registry, suggest

# the pip package each of accelerate's trackers needs (as accelerate's is_*_available checks)
TRACKER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "comet_ml": "comet-ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                    "trackio": "trackio"}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _available(name: str) -> bool:
    """accelerate's own check (TensorBoard: the tensorboard or tensorboardX package)."""
    import accelerate.utils as au

    check = getattr(au, f"is_{name}_available", None)
    return bool(check and check())


@functools.cache
def accelerate_trackers() -> Registry[type]:
    """accelerate's trackers by ``report_to`` name (its ``LOGGER_TYPE_TO_CLASS``), as a registry so an
    unknown name reads as every other unknown name; built on first use (importing accelerate is slow)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    trackers: Registry[type] = Registry("tracker")
    for name, cls in LOGGER_TYPE_TO_CLASS.items():
        trackers.register(name, cls, origin=f"accelerate {cls.__module__}:{cls.__qualname__}")
    return trackers


def tracker_class(name: str) -> type:
    """The tracker class a ``logging.report_to`` entry names, or ConfigError saying what to do."""
    from accelerate.tracking import GeneralTracker

    if is_plugin_name(name):
        try:
            cls = load_object(name, f"logging.report_to '{name}'", kind="class")
        except PluginError as exc:
            raise ConfigError(str(exc)) from None
        if not (isinstance(cls, type) and issubclass(cls, GeneralTracker)):
            raise ConfigError(f"logging.report_to '{name}' is not a subclass of accelerate.tracking.GeneralTracker")
        return cls
    trackers = accelerate_trackers()
    if name not in trackers:
        raise ConfigError(f"logging.report_to '{name}' is not a tracker" + suggest(name, trackers, listing=None)
                          + f" (accelerate's: {', '.join(trackers.names())}; or a plugin file.py:Class)")
    if not _available(name):
        raise ConfigError(f"logging.report_to '{name}' needs its package: pip install {TRACKER_PACKAGES.get(name, name)}")
    return trackers.get(name)


def tracker_problems(report_to: list[str]) -> list[str]:
    """One line per tracker the run could not start, found when the recipe loads."""
    problems = []
    for name in report_to:
        try:
            tracker_class(name)
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


def flat_config(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """section.key -> scalar: what every tracker's hyperparameter store accepts (TensorBoard's hparams
    take no nested dicts or lists)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def start_trackers(cfg: RecipeConfig, run_dir: Path, run_id: str, resume: bool) -> list[Any]:
    """accelerate trackers, started; ``run_id`` names the run where a tracker has ids (W&B), so a
    resumed run continues its run instead of opening another."""
    lg = cfg.logging
    classes = {name: tracker_class(name) for name in lg.report_to}  # each plugin file runs once here
    trackers = []
    for name, cls in classes.items():
        kwargs = dict(lg.tracker_kwargs.get(name, {}))
        if name == "wandb":
            kwargs = {"name": lg.run_name, "group": lg.group, "dir": str(run_dir), "id": run_id,
                      "resume": "allow", **kwargs}
        if is_plugin_name(name):
            accepts = inspect.signature(cls.__init__).parameters
            extra = {k: v for k, v in (("logging_dir", str(run_dir / "trackers")), ("run_id", run_id),
                                       ("resumed", resume)) if k in accepts}
            tracker = cls(lg.project, **extra, **kwargs)
        elif cls.requires_logging_directory:
            tracker = cls(lg.project, str(run_dir / name), **kwargs)
        else:
            tracker = cls(lg.project, **kwargs)
        tracker.start()
        trackers.append(tracker)
    return trackers


class MetricsLogger:
    def __init__(self, cfg: RecipeConfig, run_dir: str | Path, *, is_main_process: bool = True,
                 resume: bool = False, run_id: str | None = None):
        """``resume=False`` starts a new metrics file; a resumed run appends to the existing one (which
        the trainer has truncated to its checkpoint, see ``run_folder.truncate_logs``) and reopens its
        trackers' run (``run_id``, kept in the checkpoint)."""
        import uuid

        self.run_dir = Path(run_dir)
        self.enabled = is_main_process
        self.path = self.run_dir / "metrics.jsonl"
        self.trackers: list[Any] = []
        self._start = time.time()
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            self.path.unlink(missing_ok=True)
        self.trackers = start_trackers(cfg, self.run_dir, run_id or uuid.uuid4().hex[:12], resume)
        if not resume:  # a resumed run's configuration is already stored (W&B would reject changed values)
            config = flat_config(cfg.to_dict())
            for tracker in self.trackers:
                tracker.store_init_configuration(config)

    def tracker(self, name: str) -> Any | None:
        """The library object behind a started tracker (e.g. the wandb Run), or None."""
        for t in self.trackers:
            if getattr(t, "name", None) == name:
                return t.tracker
        return None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self._start, 3)}
        record.update({k: _clean(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(numbers, step=step)

    def log_histogram(self, name: str, values: list[float], step: int) -> None:
        """A W&B histogram of ``values`` (other trackers and metrics.jsonl get the caller's bucket metrics)."""
        run = self.tracker("wandb") if self.enabled else None
        if run is None or not values:
            return
        import wandb

        run.log({name: wandb.Histogram(values)}, step=step)

    def log_completions_table(self, rows: list[dict[str, Any]], step: int) -> None:
        """A W&B table of sample completions, with the prompt's image or a strip of its sampled frames; a tool
        run adds its trajectories' tool images (a strip) and calls."""
        run = self.tracker("wandb") if self.enabled else None
        if run is None or not rows:
            return
        import wandb

        tools = any("trajectory" in r for r in rows)
        columns = ["step", "row_id", "media", "prompt", "completion", "solution", "reward", "advantage", "problem_type"]
        table = wandb.Table(columns=columns + (["tool_images", "calls"] if tools else []))
        for r in rows:
            media = wandb.Image(r["media"]) if r.get("media") is not None else None
            cells = [step, r["row_id"], media, r["prompt"], r["completion"], str(r.get("solution")),
                     r["reward"], r["advantage"], str(r.get("problem_type"))]
            if tools:
                strip = image_strip(r.get("tool_images") or [])
                cells += [wandb.Image(strip) if strip is not None else None,
                          json.dumps((r.get("trajectory") or {}).get("calls", []))]
            table.add_data(*cells)
        run.log({"completions": table}, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def image_strip(images: list[Any], height: int = 128) -> Any:
    """PIL images side by side at one height (None for none): a trajectory's tool images in one table cell."""
    if not images or not hasattr(images[0], "resize"):
        return None
    from PIL import Image

    scaled = [im.resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    strip = Image.new("RGB", (sum(im.width for im in scaled), height))
    x = 0
    for im in scaled:
        strip.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return strip


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
