"""What every trainer shares: the learner, the prompt stream, the run folder, metrics, checkpoints
and the step loop. Subclasses implement ``train_step`` (one optimizer step, returns its metrics)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from r1_mm import run_info
from r1_mm.checkpoint import REFERENCE_FILE, CheckpointManager
from r1_mm.config import RecipeConfig, dump_recipe
from r1_mm.data import PromptStream
from r1_mm.preflight import preflight
from r1_mm.tracking import MetricsLogger
from r1_mm.trainers.backend import Learner, build_learner, load_reference_state

log = logging.getLogger(__name__)


def memory_metrics() -> dict[str, float]:
    """This process's peak memory so far: resident set (CPU) and CUDA allocations (GPU)."""
    import resource

    import torch

    out = {"memory/peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["memory/cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class BaseTrainer:
    name = "base"

    def __init__(self, cfg: RecipeConfig, *, need_reference: bool):
        self.cfg = cfg
        preflight(cfg)  # machine/launch problems stop the run here, before any weights load
        self.learner: Learner = build_learner(cfg, need_reference=need_reference)
        acc = self.learner.accelerator
        self.processor = self.learner.processor
        self.pad_id = self.processor.tokenizer.pad_token_id
        self.stream = PromptStream.from_config(self.processor, cfg.data, cfg.media, seed=cfg.training.seed,
                                               shard=(acc.process_index, acc.num_processes))
        self.run_dir = Path(cfg.training.output_dir)
        self.checkpoints = CheckpointManager(self.run_dir, keep=cfg.training.save_total_limit)
        self.step = 0
        self.resume_path = self._resume_path()
        self.resumed_state: dict[str, Any] = {}
        if self.resume_path is not None:
            self.resumed_state = CheckpointManager.read_state(self.resume_path)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.resolved.yaml").write_text(dump_recipe(cfg))
        self.metrics = MetricsLogger(cfg, self.run_dir, is_main_process=acc.is_main_process,
                                     resume=self.resume_path is not None,
                                     start_step=self.resumed_state.get("step"))

    # -- resume ---------------------------------------------------------------------------------
    def _resume_path(self) -> Path | None:
        want = self.cfg.training.resume_from
        if not want:
            return None
        if want == "latest":
            return self.checkpoints.latest()  # None: a fresh run (first launch of a resumable job)
        path = Path(want)
        if not (path / "trainer_state.json").exists():
            raise FileNotFoundError(f"training.resume_from: {path} is not a checkpoint (no trainer_state.json)")
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
        return self.checkpoints.save(self.learner, done, self.trainer_state(), save_reference=self.reference_moves)

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

    def train(self) -> Path:
        cfg = self.cfg
        acc = self.learner.accelerator
        self.write_run_info()
        if self.resume_path is not None:
            self._resume()
        bar = tqdm(range(self.step, cfg.training.max_steps), desc=self.name,
                   disable=not (cfg.logging.progress_bar and acc.is_main_process))
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
                if cfg.training.save_steps and (self.step + 1) % cfg.training.save_steps == 0:
                    self.save(self.step + 1)
            self.step = cfg.training.max_steps
            final = self.save()
        finally:
            self.metrics.close()
            self.close()
        if acc.is_main_process:
            log.info("training finished; last checkpoint %s", final)
        return self.run_dir
