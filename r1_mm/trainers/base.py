"""What every trainer shares: the learner, the prompt stream and the step loop, inside the run's
context (folder, lock, metrics, checkpoints: :class:`r1_mm.run.context.RunContext`). Subclasses implement
``train_step`` (one optimizer step, returns its metrics).

The trainers import the run layer above them at one place only, here, for that context: the Python API
builds a trainer from a recipe alone, so the trainer opens its own run (docs/architecture.md)."""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from r1_mm.config.algorithms import algorithm_spec
from r1_mm.config.recipe import ConfigError, RecipeConfig
from r1_mm.data import PromptStream
from r1_mm.models.loading import load_processor, prepare_processor
from r1_mm.rollout.agentic import tool_schemas
from r1_mm.run.context import RunContext
from r1_mm.trainers.backend import Learner, build_learner, load_reference_state, make_accelerator
from r1_mm.trainers.objects import RunObjects

log = logging.getLogger(__name__)


def memory_metrics() -> dict[str, float]:
    """This process's peak memory so far: resident set (CPU) and CUDA allocations (GPU)."""
    import torch

    from r1_mm.core.memory import peak_rss_bytes

    out = {"memory/peak_rss_mib": peak_rss_bytes() / 2**20}
    if torch.cuda.is_available():
        out["memory/cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


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
        self.run = run = RunContext(cfg)
        # everything that can be wrong with the machine, the recipe or the data is found before weights load
        run.check_inputs()
        run.preflight(model_config=getattr(model, "config", None))
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
                                               dataset=objects.train_dataset, tools=tool_schemas(cfg.tools))
        run.check_inputs(self.stream.rows, self.stream.source, self.stream.builder.media_root,
                         eval_dataset=objects.eval_dataset)
        run.claim_for_training(acc)
        try:  # from here the run holds its folder: a failure releases it
            self.step = 0
            self.learner: Learner = build_learner(cfg, need_reference=need_reference, accelerator=acc,
                                                  processor=self.processor, model=model)
            self.metrics = run.start_records(is_main_process=acc.is_main_process)
        except BaseException:
            run.close()
            raise
        run.on_close(self.close)  # the subclass's engines, before the lock is released
        self._stop_signal: int | None = None
        self.saved: Path | None = None  # the checkpoint holding the current state, if any

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def resume_path(self) -> Path | None:
        return self.run.resume_path

    @property
    def checkpoints(self) -> Any:
        return self.run.checkpoints

    # -- resume ---------------------------------------------------------------------------------
    def _resume(self) -> None:
        """Model, optimizer, scheduler and RNG states (accelerate), then data position and trainer state."""
        acc = self.learner.accelerator
        acc.load_state(str(self.resume_path))
        reference_file = self.run.resumed_reference
        if reference_file is not None and self.learner.reference is not None:
            from safetensors.torch import load_file

            load_reference_state(self.learner, load_file(str(reference_file)))
        state = self.run.resumed_state
        self.step = int(state["step"])
        self.stream.load_state_dict(state["data"])
        self.after_resume(state)
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

    def run_info_extra(self) -> dict[str, Any]:
        """What a subclass adds to run_info.json (e.g. the distillation teacher and how it is held)."""
        return {}

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
        return bool(a.grpo.ref_sync_steps) or (algorithm_spec(a.name).reference_each_round and a.iterative_dpo.reference_from_policy_each_round)

    def write_run_info(self) -> None:
        """What really runs (back-end, ZeRO stage and partitioning, device, kernels, engine, versions)."""
        info = self.run.training_info(self.learner, engine=getattr(self, "engine", None))
        info.update(self.run_info_extra())
        if self.learner.accelerator.is_main_process:
            self.run.write_info(info)
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
            self.run.close()
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
