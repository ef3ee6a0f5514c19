"""Evaluation: the eval split scored with the training rewards, greedy (or k samples per prompt).

Used every ``training.eval_steps`` inside a run and by ``r1-mm eval RECIPE --checkpoint DIR``
offline (:mod:`r1_mm.jobs.evaluate`); both report ``eval/...`` metrics of the same names.
"""

from __future__ import annotations

from typing import Any

import torch

from r1_mm.config.recipe import RecipeConfig
from r1_mm.data import PromptStream
from r1_mm.data.loading import has_split
from r1_mm.rewards.reward_metrics import metric_labels, reward_metrics
from r1_mm.rewards.runner import RewardRunner
from r1_mm.rollout.agentic import tool_schemas
from r1_mm.rollout.base import RolloutEngine, SamplingSettings


def eval_rows(cfg: RecipeConfig, processor: Any, shard: tuple[int, int] = (0, 1), dataset: Any = None) -> list:
    """Every usable eval prompt of this shard, once, in file order (bad rows follow the data policies);
    ``dataset``: eval rows given as an object (the Python API)."""
    if dataset is None and not has_split(cfg.data, "eval"):
        raise ValueError("evaluation needs data.eval_path (or data.eval_split with data.dataset_name)")
    data_cfg = type(cfg.data)(**{**cfg.data.__dict__, "shuffle": False, "max_rows": cfg.training.eval_max_rows})
    # a tool recipe's eval prompts show the tools as its training prompts do (and its engine runs them)
    stream = PromptStream.from_config(processor, data_cfg, cfg.media, split="eval", shard=shard, dataset=dataset,
                                      tools=tool_schemas(cfg.tools))
    return stream.each_once()


def evaluate(engine: RolloutEngine, samples: list, rewards: RewardRunner, cfg: RecipeConfig,
             learner: Any = None) -> dict[str, float]:
    """``learner``: inside a run, so an engine sampling from the live policy gets it (gathered)."""
    from r1_mm.trainers.backend import generate_groups

    k = cfg.training.eval_samples
    settings = SamplingSettings.from_config(cfg.rollout, seed=cfg.training.seed)
    if k == 1:
        settings = SamplingSettings(max_tokens=settings.max_tokens, temperature=0.0, seed=settings.seed)
    totals, per_fn, lengths, types = [], [], [], []
    for start in range(0, len(samples), cfg.training.eval_batch_size):
        batch = samples[start:start + cfg.training.eval_batch_size]
        groups = (generate_groups(learner, engine, batch, k, settings) if learner is not None
                  else [r.completions for r in engine.generate(batch, k, settings)])
        scored = rewards.score_groups(batch, groups)
        totals.append(scored.total)
        per_fn.append(scored.per_function)
        lengths += [len(c.token_ids) for g in groups for c in g]
        types += [s.row.get("problem_type") for s, g in zip(batch, groups, strict=True) for _ in g]
    out = {"eval/prompts": float(len(samples))}
    if not samples:
        return out
    out.update(reward_metrics(torch.cat(per_fn), torch.cat(totals), metric_labels(rewards.names), types,
                              prefix="eval/rewards/"))
    out["eval/completions/mean_length"] = sum(lengths) / len(lengths)
    return out
