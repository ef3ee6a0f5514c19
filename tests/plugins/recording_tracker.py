"""A tracker plugin for tests: an accelerate GeneralTracker that writes what it is given to a JSON
lines file, so a test sees exactly what every tracker of the run received."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.tracking import GeneralTracker, on_main_process


class RecordingTracker(GeneralTracker):
    name = "recording"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str, run_id: str, resumed: bool, tag: str = ""):
        super().__init__()
        self.path = Path(logging_dir) / "recording.jsonl"
        self.first = {"event": "init", "project": run_name, "run_id": run_id, "resumed": resumed, "tag": tag}

    @property
    def tracker(self):
        return self.path

    def _write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    @on_main_process
    def start(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write(self.first)

    @on_main_process
    def store_init_configuration(self, values: dict):
        self._write({"event": "config", "values": values})

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        self._write({"event": "log", "step": step, "values": values})

    @on_main_process
    def finish(self):
        self._write({"event": "finish"})
