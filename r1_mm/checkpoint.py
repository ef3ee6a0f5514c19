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


def export_weights(model: Any, bucket_mb: int = 256) -> dict[str, Any]:
    """Every process must call this (ZeRO-3 gathers are collective): the base model's weights in
    transformers naming, LoRA merged (``W + scale * B @ A``, by PEFT's own delta), gathered bucket by
    bucket. The same iterator feeds the vLLM engines, so an export and a weight sync never disagree."""
    from r1_mm.rollout.weights import iter_policy_weights

    return {name: tensor.cpu() for name, tensor in iter_policy_weights(model, bucket_mb)}


def export_model(model: Any, weights: dict[str, Any], out_dir: Path) -> None:
    """A plain transformers folder from :func:`export_weights` (main process only).

    No fresh model is built: under ZeRO-3, constructing one runs ``deepspeed.zero.Init``, whose
    collectives the other processes never join (a hang); the live model's config and
    ``save_pretrained`` with an explicit state dict need no collective."""
    from r1_mm.trainers.grouped_forward import unwrap

    unwrap(model).save_pretrained(out_dir, state_dict=weights, safe_serialization=True)


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
        weights = export_weights(learner.unwrapped)  # gathers ZeRO-3 shards (collective), LoRA merged
        reference = reference_state_dict(learner) if save_reference and learner.reference is not None else None
        if acc.is_main_process:
            if reference is not None:
                save_file(reference, str(tmp / REFERENCE_FILE))
            export_model(learner.unwrapped, weights, tmp / "model")
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
