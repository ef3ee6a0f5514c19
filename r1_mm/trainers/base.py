"""What every trainer shares: the learner, the prompt stream, the run folder, metrics, checkpoints
and the step loop. Subclasses implement ``train_step`` (one optimizer step, returns its metrics)."""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from r1_mm.config.recipe import ConfigError, RecipeConfig, dump_recipe
from r1_mm.data import PromptStream
from r1_mm.models.loading import load_processor, prepare_processor
from r1_mm.rollout.shm_segments import remove_stale_segments
from r1_mm.run import folder as run_folder
from r1_mm.run import info as run_info
from r1_mm.run import input_checks
from r1_mm.run.checkpoint import REFERENCE_FILE, STATE_FILE, CheckpointManager, damage
from r1_mm.run.preflight import preflight
from r1_mm.run.tracking import MetricsLogger
from r1_mm.trainers.backend import Learner, build_learner, load_reference_state, make_accelerator
from r1_mm.trainers.objects import RunObjects

log = logging.getLogger(__name__)
T = TypeVar("T")


def memory_metrics() -> dict[str, float]:
    """This process's peak memory so far: resident set (CPU) and CUDA allocations (GPU)."""
    import torch

    from r1_mm.core.memory import peak_rss_bytes

    out = {"memory/peak_rss_mib": peak_rss_bytes() / 2**20}
    if torch.cuda.is_available():
        out["memory/cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


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


class BaseTrainer:
    name = "base"

    def __init__(self, cfg: RecipeConfig, *, need_reference: bool, objects: RunObjects | None = None):
        """``objects``: a model, processor, datasets or rewards given as Python objects (the Python API);
        ``cfg`` already has the reward objects in it (``run_objects.with_objects``)."""
        self.objects = objects = objects or RunObjects()
        model = objects.model
        path = (getattr(model, "name_or_path", "") or "") if model is not None else ""
        if model is not None and not path and cfg.rollout.engine != "hf":
            raise ConfigError(f"rollout.engine={cfg.rollout.engine} loads the model by path, and the model object "
                              "has none (built from a config?): save_pretrained it and pass that folder, or use "
                              "rollout.engine=hf")
        if path:  # what the run records, and what vLLM engines load before they receive the object's weights
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=str(path)))
        self.cfg = cfg
        # everything that can be wrong with the machine, the recipe or the data is found before weights load
        input_checks.check(cfg)
        preflight(cfg, model_config=getattr(model, "config", None))
        acc = make_accelerator(cfg)
        if objects.processor is not None:
            self.processor = prepare_processor(objects.processor)
        elif model is not None and not path:
            raise ConfigError("a model object without a name_or_path needs processor= too")
        else:
            self.processor = load_processor(cfg.model)
        self.pad_id = self.processor.tokenizer.pad_token_id
        self.stream = PromptStream.from_config(self.processor, cfg.data, cfg.media, seed=cfg.training.seed,
                                               shard=(acc.process_index, acc.num_processes),
                                               dataset=objects.train_dataset)
        input_checks.check(cfg, self.stream.rows, self.stream.source, self.stream.builder.media_root)
        input_checks.check_eval_split(cfg, objects.eval_dataset)
        self.run_dir = Path(cfg.training.output_dir)
        remove_stale_segments()  # shared-memory weights of runs killed before they could remove them
        # hashing a checkpoint reads all of it: the main process does it once for every process
        self.resume_path = on_main_process(acc, self._resume_path)
        self.resumed_state: dict[str, Any] = {}
        if self.resume_path is not None:
            self.resumed_state = CheckpointManager.read_state(self.resume_path)
        self.lock = self._claim_run_folder(acc)
        if acc.num_processes > 1:
            run_folder.check_shared(self.run_dir, acc)
        self.run_id = self.resumed_state.get("run_id") or uuid.uuid4().hex[:12]
        self.checkpoints = CheckpointManager(self.run_dir, keep=cfg.training.save_total_limit, run_id=self.run_id)
        self.step = 0
        self.learner: Learner = build_learner(cfg, need_reference=need_reference, accelerator=acc,
                                              processor=self.processor, model=model)
        if acc.is_main_process:
            (self.run_dir / "recipe.resolved.yaml").write_text(dump_recipe(cfg))
            if self.resume_path is not None:
                run_folder.truncate_logs(self.run_dir, int(self.resumed_state["step"]))
        self.metrics = MetricsLogger(cfg, self.run_dir, is_main_process=acc.is_main_process,
                                     resume=self.resume_path is not None, run_id=self.run_id)
        self._stop_signal: int | None = None
        self.saved: Path | None = None  # the checkpoint holding the current state, if any

    def _claim_run_folder(self, acc: Any) -> run_folder.RunLock | None:
        """The main process locks the folder and clears an old run (when allowed); every process learns
        the outcome, so a refused run stops everywhere instead of leaving ranks waiting on a collective."""
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
        return held[0] if held else None

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

    # -- resume ---------------------------------------------------------------------------------
    def _resume_path(self) -> Path | None:
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

    def _resume(self) -> None:
        """Model, optimizer, scheduler and RNG states (accelerate), then data position and trainer state."""
        acc = self.learner.accelerator
        acc.load_state(str(self.resume_path))
        reference_file = self.resume_path / REFERENCE_FILE
        if reference_file.exists() and self.learner.reference is not None:
            from safetensors.torch import load_file

            load_reference_state(self.learner, load_file(str(reference_file)))
        self.step = int(self.resumed_state["step"])
        self.stream.load_state_dict(self.resumed_state["data"])
        self.after_resume(self.resumed_state)
        if acc.is_main_process:
            log.info("resumed from %s at step %d", self.resume_path, self.step)

    def after_resume(self, state: dict[str, Any]) -> None:
        """Subclasses restore their own state (counters, engines holding weights)."""

    # -- subclass hooks -------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows after each step."""
        return {}

    def on_logged(self) -> None:
        """Called after a step's metrics were written (e.g. to dump sample completions)."""

    def trainer_state(self) -> dict[str, Any]:
        return {"data": self.stream.state_dict()}

    def close(self) -> None:
        return None

    # -- loop -----------------------------------------------------------------------------------
    def save(self, steps_done: int | None = None) -> Path:
        """A checkpoint named by the number of completed steps: resuming from it starts at that step."""
        done = self.step if steps_done is None else steps_done
        self.saved = self.checkpoints.save(self.learner, done, self.trainer_state(), save_reference=self.reference_moves)
        return self.saved

    def save_final(self) -> Path:
        """The end-of-run checkpoint, unless this run's folder already holds one of this state (max_steps a
        multiple of save_steps, or a resume from the final checkpoint): it is not written twice."""
        final = self.checkpoints.root / f"step-{self.step:06d}"
        if self.saved is not None and self.saved.resolve() == final.resolve():
            return final
        return self.save()

    @property
    def reference_moves(self) -> bool:
        """Does the reference change during the run (then checkpoints must carry it)?"""
        a = self.cfg.algorithm
        return bool(a.ref_sync_steps) or (a.name == "iterative_dpo" and a.reference_from_policy_each_round)

    def write_run_info(self) -> None:
        """What really runs (back-end, ZeRO stage and partitioning, device, kernels, engine, versions)."""
        info = run_info.collect(self.cfg, self.learner, engine=getattr(self, "engine", None))
        if self.learner.accelerator.is_main_process:
            run_info.write(self.run_dir, info)
            log.info("run info: %s on %s, %d process(es), ZeRO stage %s, attention %s",
                     info["distributed_type"], info["device"], info["num_processes"], info["zero_stage"],
                     info["attn_implementation"])

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self._stop_signal = signum
        if not self.learner.accelerator.is_main_process:  # every rank gets the signal: one line for the run
            return
        log.warning("%s received: finishing step %d, then saving a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name, self.step)

    def _stop_requested(self) -> int | None:
        """The signal any process received, agreed by all (the checkpoint is collective)."""
        import torch

        acc = self.learner.accelerator
        flag = torch.tensor([float(self._stop_signal or 0)], device=acc.device)
        if acc.num_processes > 1:
            flag = acc.reduce(flag, reduction="max")
        return int(flag.item()) or None

    def train(self) -> Path:
        """Train to max_steps. SIGTERM / SIGINT (a scheduler's pre-emption, Ctrl-C) end the current step,
        save a checkpoint, release the engines (and their shared memory) and raise
        :class:`TrainingInterrupted` naming the checkpoint to resume from."""
        cfg = self.cfg
        acc = self.learner.accelerator
        self.write_run_info()
        if self.resume_path is not None:
            self._resume()
            self.saved = self.resume_path
        bar = tqdm(range(self.step, cfg.training.max_steps), desc=self.name,
                   disable=not (cfg.logging.progress_bar and acc.is_main_process))
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        interrupted: tuple[int, Path] | None = None
        try:
            for self.step in bar:
                t0 = time.time()
                metrics = self.train_step()
                metrics.setdefault("time/step_s", time.time() - t0)
                metrics.update(self.stream.report.counts())
                metrics.update(memory_metrics())
                if self.step % cfg.logging.logging_steps == 0 or self.step == cfg.training.max_steps - 1:
                    self.metrics.log(metrics, self.step)
                    self.on_logged()
                bar.set_postfix(**self.progress(metrics))
                stop = self._stop_requested()
                if stop is not None:
                    interrupted = (stop, self.save(self.step + 1))
                    break
                if cfg.training.save_steps and (self.step + 1) % cfg.training.save_steps == 0:
                    self.save(self.step + 1)
            else:
                self.step = cfg.training.max_steps
                final = self.save_final()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.metrics.close()
            self.close()
            if self.lock is not None:
                self.lock.release()
        if interrupted is not None:
            raise TrainingInterrupted(*interrupted, main_process=acc.is_main_process)
        if acc.is_main_process:
            log.info("training finished; last checkpoint %s", final)
        return self.run_dir


class TrainingInterrupted(RuntimeError):
    """A run stopped by a signal after saving a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path, main_process: bool = True):
        self.signum, self.checkpoint = signum, checkpoint
        self.main_process = main_process  # the process that says so (every process raises this)
        super().__init__(f"stopped by {signal.Signals(signum).name} after saving {checkpoint}; resume with "
                         f"training.resume_from=latest (or training.resume_from={checkpoint})")
