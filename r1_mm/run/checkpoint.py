"""Checkpoints: accelerate's full training state plus the trainer's own, written atomically.

Layout: ``RUN/checkpoints/step-000010/{accelerate state files, trainer_state.json, model/}`` where
``model/`` is a plain transformers folder (LoRA merged) that ``from_pretrained`` loads. A checkpoint
is written to a hidden temporary folder and renamed into place only when complete, so a crash
mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
REFERENCE_FILE = "reference.safetensors"

log = logging.getLogger(__name__)


def export_weights(model: Any, bucket_mb: int = 256) -> dict[str, Any]:
    """Every process must call this (ZeRO-3 gathers are collective): the base model's weights in
    transformers naming, LoRA merged (``W + scale * B @ A``, by PEFT's own delta), gathered bucket by
    bucket. The same iterator feeds the vLLM engines, so an export and a weight sync never disagree."""
    from r1_mm.models.weights import iter_policy_weights

    return {name: tensor.cpu() for name, tensor in iter_policy_weights(model, bucket_mb)}


def export_model(model: Any, weights: dict[str, Any], out_dir: Path) -> None:
    """A plain transformers folder from :func:`export_weights` (main process only).

    No fresh model is built: under ZeRO-3, constructing one runs ``deepspeed.zero.Init``, whose
    collectives the other processes never join (a hang); the live model's config and
    ``save_pretrained`` with an explicit state dict need no collective."""
    from r1_mm.models.weights import unwrap

    unwrap(model).save_pretrained(out_dir, state_dict=weights, safe_serialization=True)


MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 2  # 1 (no "format" key): {file: size}; 2: sizes and sha256 hashes


def file_sha256(path: Path) -> str:
    """Streamed in chunks (a checkpoint's files are gigabytes; memory stays flat)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash_all(folder: Path, names: list[str]) -> dict[str, str]:
    """Files hashed on a few threads: hashlib releases the GIL, so big files hash in parallel."""
    workers = max(1, min(4, os.cpu_count() or 1, len(names)))
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(names, pool.map(lambda name: file_sha256(folder / name), names), strict=True))


def write_manifest(folder: Path) -> None:
    """Every file of a finished checkpoint with its size and sha256: a later resume (and retention)
    tells a damaged checkpoint, also when the damage kept the file's size (a flipped byte)."""
    names = [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file()]
    hashes = _hash_all(folder, names)
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": hashes[name]} for name in names}
    (folder / MANIFEST_FILE).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=0))


def _manifest_files(manifest: dict[str, Any]) -> dict[str, tuple[int, str | None]]:
    """Both manifest formats as {file: (bytes, sha256 or None)}; malformed entries raise."""
    if manifest.get("format") == MANIFEST_FORMAT:
        return {str(name): (int(e["bytes"]), str(e["sha256"])) for name, e in manifest["files"].items()}
    return {str(name): (int(size), None) for name, size in manifest.items()}  # sizes only


def damage(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None when it is intact): sizes first (cheap), then the
    sha256 of every file the manifest lists."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"{STATE_FILE} unreadable ({type(exc).__name__})"
    if not isinstance(state, dict) or "step" not in state:
        return f"{STATE_FILE} has no step"
    manifest = folder / MANIFEST_FILE
    if not manifest.exists():
        return None  # written before manifests existed: trusted as before
    try:
        files = _manifest_files(json.loads(manifest.read_text()))
    except (OSError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        return f"{MANIFEST_FILE} unreadable"
    for name, (size, _) in files.items():
        path = folder / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    hashed = [name for name, (_, digest) in files.items() if digest is not None]
    for name, digest in _hash_all(folder, hashed).items():
        if digest != files[name][1]:
            return f"{name} has changed since it was written (sha256 differs from the manifest, size unchanged)"
    return None


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int = 2, run_id: str | None = None):
        """``run_id``: retention deletes only checkpoints this run wrote (or checkpoints of a run it resumed)."""
        self.root = Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)
        self.run_id = run_id

    def all(self) -> list[Path]:
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / STATE_FILE).exists())

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def latest_intact(self) -> tuple[Path | None, list[str]]:
        """The newest checkpoint that is whole, and why each newer one was passed over."""
        skipped = []
        for path in reversed(self.all()):
            why = damage(path)
            if why is None:
                return path, skipped
            skipped.append(f"{path.name}: {why}")
        return None, skipped

    def _own(self, path: Path) -> bool:
        try:
            return self.read_state(path).get("run_id") == self.run_id
        except (OSError, json.JSONDecodeError):
            return False

    def prune(self, written: Path | None = None) -> list[Path]:
        """Keep this run's newest ``keep`` checkpoints; never touch another run's. Returns what was deleted.

        Before deleting, the kept ones are verified (newest first, until one is intact; ``written``, the
        checkpoint whose manifest was hashed a moment ago, counts as intact unread): when none is, the
        newest intact one among those due for deletion stays, so retention never deletes the run's last
        resumable checkpoint."""
        own = [p for p in self.all() if self._own(p)]
        doomed, kept = own[:-self.keep], own[-self.keep:]
        if doomed and not any(p == written or damage(p) is None for p in reversed(kept)):
            spared = next((p for p in reversed(doomed) if damage(p) is None), None)
            if spared is not None:
                doomed.remove(spared)
                log.warning("checkpoint retention: the %d newest checkpoint(s) are damaged; keeping %s, the newest "
                            "intact one", len(kept), spared.name)
        for old in doomed:
            shutil.rmtree(old, ignore_errors=True)
        return doomed

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
        acc.wait_for_everyone()  # every process's state files are written before the manifest lists them
        if acc.is_main_process:
            if reference is not None:
                save_file(reference, str(tmp / REFERENCE_FILE))
            export_model(learner.unwrapped, weights, tmp / "model")
            learner.processor.save_pretrained(tmp / "model")
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "run_id": self.run_id, **trainer_state}, indent=1))
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self.prune(written=final)
        acc.wait_for_everyone()
        return final

    @staticmethod
    def read_state(path: str | Path) -> dict[str, Any]:
        return json.loads((Path(path) / STATE_FILE).read_text())
