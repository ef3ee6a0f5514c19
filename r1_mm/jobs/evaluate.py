"""``r1-mm eval RECIPE --checkpoint DIR``: a checkpoint's exported model scored on the recipe's eval
split with its rewards, the same ``eval/...`` metrics a run logs every ``training.eval_steps``
(:mod:`r1_mm.trainers.evaluation`); written next to the model as eval.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from r1_mm.config.recipe import ModelConfig, RecipeConfig
from r1_mm.rewards.runner import RewardRunner
from r1_mm.run import input_checks
from r1_mm.run.context import RunContext
from r1_mm.run.preflight import check_model
from r1_mm.trainers.evaluation import eval_rows, evaluate


def evaluate_checkpoint(cfg: RecipeConfig, checkpoint: str | Path) -> dict[str, float]:
    """Score a checkpoint's exported model (CHECKPOINT/model, or a plain transformers folder)."""
    from r1_mm.models.loading import (  # at call time, as every job loads models
        load_for_inference,
        load_processor,
    )
    from r1_mm.rollout import make_engine

    folder = Path(checkpoint)
    folder = folder / "model" if (folder / "model" / "config.json").exists() else folder
    model_cfg = ModelConfig(**{**cfg.model.__dict__, "name_or_path": str(folder), "lora": False})
    cfg = type(cfg)(**{**cfg.__dict__, "model": model_cfg})
    input_checks.check(cfg)  # the recipe's rewards, then every eval row, before the model loads
    input_checks.check_eval_split(cfg, evaluating=True)
    check_model(cfg)  # the checkpoint's family, on this engine
    processor = load_processor(model_cfg)
    model = load_for_inference(model_cfg, cfg.rollout.engine)
    with RunContext(cfg) as run:  # the engine and the reward workers released however the job ends
        engine = make_engine(cfg.rollout.engine, model=model, processor=processor, cfg=cfg)
        if cfg.tools.functions:  # a tool recipe is evaluated with its tools, as it trained
            from r1_mm.rollout.agentic import ToolRollout

            engine = ToolRollout(engine, processor, cfg.tools, cfg.media)
        run.on_close(engine.close)
        runner = RewardRunner.from_recipe(cfg)
        run.on_close(runner.close)
        with torch.no_grad():
            metrics = evaluate(engine, eval_rows(cfg, processor), runner, cfg)
    (folder.parent / "eval.json").write_text(json.dumps(metrics, indent=1))
    return metrics
