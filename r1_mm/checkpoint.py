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
REFERENCE_FILE = "reference.safetensors"


def export_model(model: Any, full_state_dict: dict[str, Any], out_dir: Path) -> None:
    """Save a plain transformers folder from a full (gathered) state dict; LoRA adapters are merged.

    The live model may hold ZeRO-3 partitions (empty tensors), so a LoRA model is rebuilt on the
    CPU from its config, loaded with the gathered weights, and merged there.
    """
    if hasattr(model, "merge_and_unload"):
        from peft import get_peft_model
        from transformers import AutoModelForImageTextToText

        base = model.get_base_model()
        fresh = AutoModelForImageTextToText.from_config(base.config, dtype=next(iter(full_state_dict.values())).dtype)
        fresh = get_peft_model(fresh, model.peft_config["default"])
        missing, unexpected = fresh.load_state_dict(full_state_dict, strict=False)
        if unexpected or [k for k in missing if "lora_" in k or "base_layer" in k]:
            raise RuntimeError(f"LoRA export: state dict does not fit the model (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        fresh.merge_and_unload().save_pretrained(out_dir, safe_serialization=True)
        return
    model.save_pretrained(out_dir, state_dict=full_state_dict, safe_serialization=True)


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

    def save(self, learner: Any, step: int, trainer_state: dict[str, Any], *, save_reference: bool = False) -> Path:
        """``save_reference``: also store the reference weights (only needed once they moved)."""
        from safetensors.torch import save_file

        from r1_mm.trainers.backend import reference_state_dict

        acc = learner.accelerator
        final = self.root / f"step-{step:06d}"
        tmp = self.root / f".tmp-step-{step:06d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(output_dir=str(tmp))
        state_dict = acc.get_state_dict(learner.policy)  # gathers ZeRO-3 shards (collective)
        reference = reference_state_dict(learner) if save_reference and learner.reference is not None else None
        if acc.is_main_process:
            if reference is not None:
                save_file(reference, str(tmp / REFERENCE_FILE))
            export_model(acc.unwrap_model(learner.policy), state_dict, tmp / "model")
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
