"""A rollout-only run: data -> decoded media -> G completions per prompt, logged step by step.

This is the smallest real job the framework runs end to end (model, data pipeline, engine,
metrics); the learners wrap the same steps with rewards and updates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from r1_mm.config.recipe import RecipeConfig
from r1_mm.core.seeds import derive_seed
from r1_mm.data import PromptStream
from r1_mm.models.loading import load_for_inference, load_processor
from r1_mm.rollout.agentic import ToolRollout, tool_schemas
from r1_mm.rollout.base import RolloutEngine, SamplingSettings
from r1_mm.rollout.engines import make_engine
from r1_mm.rollout.records import completion_record
from r1_mm.run import info as run_info
from r1_mm.run import input_checks
from r1_mm.run.context import RunContext
from r1_mm.run.tracking import MetricsLogger


def run_rollouts(cfg: RecipeConfig) -> Path:
    torch.manual_seed(cfg.training.seed)
    run = RunContext(cfg)
    run.preflight(learner=False)  # the model's family and the engine; no learner, so no forward mode
    processor = load_processor(cfg.model)
    stream = PromptStream.from_config(processor, cfg.data, cfg.media, seed=cfg.training.seed, tools=tool_schemas(cfg.tools))
    input_checks.check_generation_job(cfg, stream.rows, stream.source, stream.builder.media_root)
    with run:  # the lock, the engine and the metrics are released however the job ends
        run.claim()
        logger = run.start_records()
        model = load_for_inference(cfg.model, cfg.rollout.engine)
        engine = make_engine(cfg.rollout.engine, model=model, processor=processor, cfg=cfg)
        if cfg.tools.functions:  # trajectories with tool calls, written whole (their tool images as PNG files)
            engine = ToolRollout(engine, processor, cfg.tools, cfg.media)
        run.on_close(engine.close)
        run.write_info(run_info.collect_rollout_only(cfg, model, engine))
        _sample(cfg, stream, engine, logger, run.run_dir)
    return run.run_dir


def _sample(cfg: RecipeConfig, stream: PromptStream, engine: RolloutEngine, logger: MetricsLogger, run_dir: Path) -> None:
    n = cfg.rollout.num_generations
    bar = tqdm(range(cfg.training.max_steps), desc="rollout", disable=not cfg.logging.progress_bar)
    with (run_dir / "completions.jsonl").open("w") as out:
        for step in bar:
            t0 = time.time()
            batch = stream.next_batch(cfg.training.prompts_per_step)
            results = engine.generate(batch, n, SamplingSettings.from_config(cfg.rollout, seed=derive_seed(cfg.training.seed, "jobs.rollout", step)))
            seconds = time.time() - t0
            lengths = [len(c.token_ids) for r in results for c in r.completions]
            for i, r in enumerate(results):
                for j, c in enumerate(r.completions):
                    record = completion_record(r.sample, c, run_dir / "tool_images", key=f"step{step}-prompt{i}-{j}")
                    out.write(json.dumps({"step": step, **record}) + "\n")
            metrics = {
                "completions/mean_length": sum(lengths) / len(lengths),
                "completions/truncated_ratio": sum(c.truncated for r in results for c in r.completions) / len(lengths),
                "prompts/mean_tokens": sum(s.num_prompt_tokens for s in batch) / len(batch),
                "throughput/completion_tokens_per_s": sum(lengths) / max(seconds, 1e-9),
                **stream.report.counts(),
                **getattr(engine, "stats", {}),  # tool runs: calls, success, turns
            }
            logger.log(metrics, step)
            bar.set_postfix(len=f"{metrics['completions/mean_length']:.1f}",
                            tok_s=f"{metrics['throughput/completion_tokens_per_s']:.0f}")
