"""Checkpoints: accelerate's full training state plus the trainer's own, written atomically.

Layout: ``RUN/checkpoints/step-000010/{accelerate state files, trainer_state.json, model/}`` where
``model/`` is a plain transformers folder (LoRA merged) that ``from_pretrained`` loads. A checkpoint
is written to a hidden temporary folder and renamed into place only when complete, so a crash
mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)

    def all(self) -> list[Path]:
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / STATE_FILE).exists())

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, learner: Any, step: int, trainer_state: dict[str, Any]) -> Path:
        acc = learner.accelerator
        final = self.root / f"step-{step:06d}"
        tmp = self.root / f".tmp-step-{step:06d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(output_dir=str(tmp))
        state_dict = acc.get_state_dict(learner.policy)  # gathers ZeRO-3 shards (collective)
        if acc.is_main_process:
            model = acc.unwrap_model(learner.policy)
            export = model
            if hasattr(model, "merge_and_unload"):
                import copy

                export = copy.deepcopy(model).merge_and_unload()
                state_dict = None
            export.save_pretrained(tmp / "model", state_dict=state_dict, safe_serialization=True)
            learner.processor.save_pretrained(tmp / "model")
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.all()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    @staticmethod
    def read_state(path: str | Path) -> dict[str, Any]:
        return json.loads((Path(path) / STATE_FILE).read_text())
