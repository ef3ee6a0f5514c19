"""A run's output folder: one run at a time, never silently over another, and logs that match the
checkpoint a run resumes from.

Why: a fresh run into a finished run's folder used to overwrite it (and retention then deleted the
new checkpoints, which had lower step numbers); two runs in one folder raced; a resumed run
duplicated the steps after its checkpoint in completions.jsonl.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any

from r1_mm.config.recipe import ConfigError

# what a run writes into its folder (anything else, e.g. the demo's data/, is left alone)
RUN_FILES = ("checkpoints", "metrics.jsonl", "completions.jsonl", "run_info.json", "recipe.resolved.yaml",
             "curves.png", "rollout_servers", "trackers",
             # folders of accelerate's trackers that log locally (r1_mm.run.tracking: run_dir / tracker name)
             "wandb", "tensorboard", "aim", "mlflow", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")
LOCK_FILE = ".r1mm.lock"
APPEND_ONLY_LOGS = ("metrics.jsonl", "completions.jsonl")


def writable_problem(folder: str | Path, field: str) -> str | None:
    """Why ``folder`` cannot hold a run's files, or None. Tried for real (a probe folder made and removed in
    the nearest existing parent), not read from permission bits: root passes every permission test, yet
    cannot write into /proc or a read-only mount. Nothing is left behind, so a run refused later for
    another reason leaves no empty folder."""
    path = Path(folder).expanduser().absolute()
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{field} {folder} cannot be created: {parent} is a file, not a folder; choose another folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".r1mm-probe-", dir=parent))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return f"{field} {folder} cannot be written ({reason} in {parent}); choose a folder you can write"
    return None


def run_files(run_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def prepare(run_dir: Path, *, resuming: bool, overwrite: bool) -> None:
    """A fresh run needs a folder without an earlier run's files, or ``overwrite`` to remove them."""
    found = run_files(run_dir)
    if resuming or not found:
        return
    if not overwrite:
        raise ConfigError(f"training.output_dir {run_dir} already holds a run ({', '.join(found)}); resume it with "
                          "training.resume_from=latest, choose another output_dir, or set "
                          "training.overwrite_output_dir=true to delete it")
    for name in found:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


class RunLock:
    """An exclusive lock on the folder, held by the run's main process for its whole life (released by
    the kernel if the process dies, so a crashed run never blocks its own resume)."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_FILE
        self._file: IO[str] | None = open(self.path, "a+")  # noqa: SIM115 (held open on purpose)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "?"
            self._file.close()
            self._file = None
            raise ConfigError(f"training.output_dir {run_dir} is in use by another run (pid {holder}); wait for it, "
                              "or choose another output_dir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def step_of(line: str) -> int:
    """The step of a log line; a line cut short by a killed process counts as unfinished."""
    try:
        return int(json.loads(line).get("step", -1))
    except (json.JSONDecodeError, ValueError, AttributeError):
        return 1 << 62


def truncate_logs(run_dir: Path, start_step: int) -> None:
    """Drop every append-only log line of a step at or after ``start_step``: a crashed run logged steps
    after its last checkpoint, and the resumed run is about to redo them."""
    for name in APPEND_ONLY_LOGS:
        path = run_dir / name
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if step_of(line) < start_step]
            path.write_text("".join(line + "\n" for line in kept))


def check_shared(run_dir: Path, acc: Any) -> None:
    """Every process of the launch sees the same run folder (checkpoints need it: each rank writes its
    own optimizer and parameter shards, and the main process writes the manifest that lists them).
    One probe file per process, read back by the main process; a ConfigError everywhere otherwise."""
    from accelerate.utils import broadcast_object_list

    token = [uuid.uuid4().hex if acc.is_main_process else None]
    broadcast_object_list(token, from_process=0)
    probe = run_dir / f".r1mm-probe-{token[0]}-{acc.process_index}"
    run_dir.mkdir(parents=True, exist_ok=True)
    probe.write_text(socket.gethostname())
    acc.wait_for_everyone()
    missing = [None]
    if acc.is_main_process:
        missing = [[r for r in range(acc.num_processes) if not (run_dir / f".r1mm-probe-{token[0]}-{r}").exists()]]
    broadcast_object_list(missing, from_process=0)
    acc.wait_for_everyone()
    probe.unlink(missing_ok=True)
    if missing[0]:
        raise ConfigError(f"training.output_dir {run_dir} is not the same folder for every process (rank 0 does not "
                          f"see the files of ranks {missing[0]}): checkpoints need a filesystem every machine shares "
                          "(NFS, Lustre, a mounted bucket); see docs/multi-node.md")
