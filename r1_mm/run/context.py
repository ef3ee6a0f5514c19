"""One run's folder and records, held for the run's whole life and released in one place.

Every job (training, rollout-only, ...) runs inside a :class:`RunContext`: it checks the machine and the
launch (preflight), claims the output folder (lock, clearing or resuming), writes the resolved recipe,
run_info.json and metrics, and in :meth:`RunContext.close` (called from ``finally`` or ``with``) closes
what the run opened (metrics and trackers, engines, servers and their shared memory) and releases the
lock, so an exception leaks neither the lock nor a server process.

Training runs on several processes: the main process claims the folder and hashes checkpoints, and
every process learns the outcome (:func:`on_main_process`), so a refusal stops every rank instead of
leaving the others waiting on a collective.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from r1_mm.config.recipe import ConfigError, RecipeConfig, dump_recipe
from r1_mm.rollout.shm_segments import remove_stale_segments
from r1_mm.run import folder as run_folder
from r1_mm.run import info as run_info
from r1_mm.run import input_checks
from r1_mm.run.checkpoint import REFERENCE_FILE, STATE_FILE, CheckpointManager, damage
from r1_mm.run.preflight import preflight
from r1_mm.run.tracking import MetricsLogger

log = logging.getLogger(__name__)
T = TypeVar("T")


def on_main_process(acc: Any, fn: Callable[[], T]) -> T:
    """``fn()`` run by the main process only, its result (or its ConfigError) given to every process, so
    a refusal stops every rank instead of leaving the others waiting on a collective."""
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if acc.is_main_process:
        try:
            result = fn()
        except ConfigError as exc:
            error = str(exc)
    if acc.num_processes > 1:
        shared = [(result, error)]
        broadcast_object_list(shared, from_process=0)
        result, error = shared[0]
    if error:
        raise ConfigError(error)
    return result


class RunContext:
    """The output folder of one run and everything the run must give back when it ends."""

    def __init__(self, cfg: RecipeConfig | None):
        """``cfg=None``: a job without a run folder (``r1-mm rewards check``) that still has things to
        release however it ends."""
        self.cfg = cfg
        self.run_dir = Path(cfg.training.output_dir) if cfg is not None else None
        self.lock: run_folder.RunLock | None = None
        self.metrics: MetricsLogger | None = None
        self.resume_path: Path | None = None
        self.resumed_state: dict[str, Any] = {}
        self.run_id: str = uuid.uuid4().hex[:12]
        self.checkpoints: CheckpointManager | None = None
        self._to_close: list[Callable[[], Any]] = []

    # -- before any model loads ---------------------------------------------------------------
    def preflight(self, **kwargs: Any) -> None:
        """The machine and the launch, checked against the recipe (see :mod:`r1_mm.run.preflight`)."""
        preflight(self.cfg, **kwargs)

    def check_inputs(self, rows: list[dict[str, Any]] | None = None, source: str | None = None,
                     media_root: Path | None = None, *, eval_dataset: Any = None) -> None:
        """The recipe (without rows), or the recipe against the training rows and the eval split, checked
        before any model loads (see :mod:`r1_mm.run.input_checks`)."""
        input_checks.check(self.cfg, rows, source, media_root)
        if rows is not None:
            input_checks.check_eval_split(self.cfg, eval_dataset)

    # -- the folder ---------------------------------------------------------------------------
    def claim(self) -> None:
        """One process, no resume (``r1-mm rollout``): lock the folder and clear an old run when allowed."""
        self.lock = run_folder.RunLock(self.run_dir)
        run_folder.prepare(self.run_dir, resuming=False, overwrite=self.cfg.training.overwrite_output_dir)

    def claim_for_training(self, acc: Any) -> None:
        """Training: find the checkpoint to resume (the main process hashes it once for all), lock and
        prepare the folder on the main process, check every process sees the same folder, and open the
        checkpoint manager under the run's id (kept across resumes)."""
        remove_stale_segments()  # shared-memory weights of runs killed before they could remove them
        self.resume_path = on_main_process(acc, self._find_resume_path)
        if self.resume_path is not None:
            self.resumed_state = CheckpointManager.read_state(self.resume_path)
        held: list[run_folder.RunLock] = []

        def claim() -> None:
            lock = run_folder.RunLock(self.run_dir)
            try:
                if self.resume_path is None and self.cfg.training.resume_from == "latest":
                    self._start_latest_fresh()
                run_folder.prepare(self.run_dir, resuming=self.resume_path is not None,
                                   overwrite=self.cfg.training.overwrite_output_dir)
            except ConfigError:
                lock.release()
                raise
            held.append(lock)

        on_main_process(acc, claim)
        self.lock = held[0] if held else None
        if acc.num_processes > 1:
            run_folder.check_shared(self.run_dir, acc)
        self.run_id = self.resumed_state.get("run_id") or self.run_id
        self.checkpoints = CheckpointManager(self.run_dir, keep=self.cfg.training.save_total_limit, run_id=self.run_id)

    def start_records(self, *, is_main_process: bool = True) -> MetricsLogger:
        """The resolved recipe, the logs cut back to a resumed checkpoint, and the metrics logger."""
        if is_main_process:
            self.write_recipe()
            if self.resume_path is not None:
                run_folder.truncate_logs(self.run_dir, int(self.resumed_state["step"]))
        self.metrics = MetricsLogger(self.cfg, self.run_dir, is_main_process=is_main_process,
                                     resume=self.resume_path is not None, run_id=self.run_id)
        return self.metrics

    def write_recipe(self) -> None:
        """recipe.resolved.yaml: the recipe as this run resolved it (defaults and overrides applied)."""
        (self.run_dir / "recipe.resolved.yaml").write_text(dump_recipe(self.cfg))

    def training_info(self, learner: Any, *, engine: Any) -> dict[str, Any]:
        """What really runs (back-end, ZeRO stage and partitioning, device, kernels, engine, versions)."""
        return run_info.collect(self.cfg, learner, engine=engine)

    def write_info(self, info: dict[str, Any]) -> None:
        run_info.write(self.run_dir, info)

    @property
    def resumed_reference(self) -> Path | None:
        """The reference weights saved with the resumed checkpoint (a reference that moves), if any."""
        if self.resume_path is None or not (self.resume_path / REFERENCE_FILE).exists():
            return None
        return self.resume_path / REFERENCE_FILE

    # -- the end --------------------------------------------------------------------------------
    def on_close(self, fn: Callable[[], Any]) -> None:
        """``fn`` runs at :meth:`close`, before the lock is released (engines, servers, shared memory)."""
        self._to_close.append(fn)

    def close(self) -> None:
        """Metrics and trackers closed, then what was registered (last first), then the lock released.
        Safe to call twice; a failure in one step does not skip the others."""
        errors: list[BaseException] = []
        steps = ([self.metrics.close] if self.metrics is not None else []) + self._to_close[::-1]
        self.metrics, self._to_close = None, []
        for step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 (the lock must be released whatever failed)
                log.exception("closing the run: %s failed", getattr(step, "__qualname__", step))
                errors.append(exc)
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if errors:
            raise errors[0]

    def __enter__(self) -> RunContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- resume ---------------------------------------------------------------------------------
    def _find_resume_path(self) -> Path | None:
        """The checkpoint to resume: the newest intact one for ``latest`` (damaged newer ones are named
        and passed over), or the given folder, which must be intact."""
        want = self.cfg.training.resume_from
        if not want:
            return None
        if want == "latest":
            path, skipped = CheckpointManager(self.run_dir).latest_intact()
            for why in skipped:
                log.warning("training.resume_from=latest: skipping damaged checkpoint %s; resuming from %s", why,
                            path.name if path is not None else "none")
            return path  # None: a fresh run (first launch of a resumable job)
        path = Path(want)
        if not (path / STATE_FILE).exists():
            raise ConfigError(f"training.resume_from: {path} is not a checkpoint (no {STATE_FILE}); give a "
                              "checkpoints/step-N folder or 'latest'")
        why = damage(path)
        if why is not None:
            raise ConfigError(f"training.resume_from: checkpoint {path} is damaged ({why}); give an older one or 'latest'")
        return path

    def _start_latest_fresh(self) -> None:
        """``resume_from: latest`` without a checkpoint: a preemptible job's first launch, or one killed
        before its first save. Either way it starts from step 0 (and says so), clearing what an attempt
        that saved nothing left behind, so every restart of the job can start; only damaged checkpoints
        stop it (they may be worth repairing)."""
        damaged = CheckpointManager(self.run_dir).all()
        if damaged and not self.cfg.training.overwrite_output_dir:
            raise ConfigError(f"training.resume_from=latest: no intact checkpoint in {self.run_dir / 'checkpoints'} "
                              f"({', '.join(p.name for p in damaged)} are damaged, see above); resume one by path once "
                              "repaired, or set training.overwrite_output_dir=true to start over")
        left = run_folder.run_files(self.run_dir)
        if left:
            run_folder.prepare(self.run_dir, resuming=False, overwrite=True)
            log.warning("training.resume_from=latest: no checkpoint in %s (the earlier attempt stopped before its first "
                        "save); starting from step 0 and removed its %s", self.run_dir / "checkpoints", ", ".join(left))
        else:
            log.info("training.resume_from=latest: no checkpoint yet in %s; starting from step 0", self.run_dir)
