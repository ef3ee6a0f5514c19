"""Critic-driven iterative DPO (the LLaVA-OneVision-Chat recipe with LLaVA-Critic).

Round after round: sample k responses per prompt from the current policy (rollout engine, recipe
temperature), score them with the recipe's rewards (the ``critic`` reward, or any other), pair the
best with the worst (groups whose scores tie are skipped), train one DPO pass over those pairs, and
start the next round from the updated policy (and, by default, a reference reset to it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from r1_mm.config.recipe import ConfigError, RecipeConfig
from r1_mm.core.seeds import derive_seed
from r1_mm.data import Sample
from r1_mm.rewards.runner import RewardRunner
from r1_mm.rollout.base import SamplingSettings
from r1_mm.rollout.batch import RolloutBatch
from r1_mm.rollout.engines import make_engine
from r1_mm.trainers.backend import generate_groups, sync_reference
from r1_mm.trainers.objects import RunObjects, with_objects
from r1_mm.trainers.preference import PreferenceTrainer
from r1_mm.trainers.preference_batch import PreferenceBatch
from r1_mm.trainers.registry import register_trainer

MAX_EMPTY_ROUNDS = 5


def best_and_worst(scores: torch.Tensor) -> tuple[int, int] | None:
    """Indices of the best and worst scored responses of a group; None when they tie or none is scored."""
    valid = ~torch.isnan(scores)
    if valid.sum() < 2:
        return None
    masked_hi = torch.where(valid, scores, torch.tensor(float("-inf")))
    masked_lo = torch.where(valid, scores, torch.tensor(float("inf")))
    best, worst = int(masked_hi.argmax()), int(masked_lo.argmin())
    return None if scores[best] == scores[worst] else (best, worst)


class IterativeDPOTrainer(PreferenceTrainer):
    name = "iterative_dpo"

    def __init__(self, cfg: RecipeConfig | dict | str, **objects: Any):
        """The keywords of :class:`PreferenceTrainer` (model, processor, datasets, reward_funcs)."""
        given = RunObjects(**objects)
        if not with_objects(cfg, given).rewards.functions:
            raise ConfigError("iterative_dpo ranks responses with rewards.functions (e.g. the critic); it is empty "
                              "(or pass reward_funcs=)")
        super().__init__(cfg, **objects)
        cfg = self.cfg
        self.rewards = RewardRunner.from_recipe(cfg)
        self.engine = make_engine(cfg.rollout.engine, model=self.learner.unwrapped, processor=self.processor, cfg=cfg)
        self.buffer: list[tuple[Sample, list[int], list[int]]] = []
        self.round = 0
        self.round_stats: dict[str, float] = {}

    def new_round(self) -> None:
        cfg = self.cfg
        if self.round > 0:
            self.engine.update_weights(self.learner.unwrapped)
            if cfg.algorithm.iterative_dpo.reference_from_policy_each_round:
                sync_reference(self.learner, 1.0)
        k = cfg.rollout.num_generations
        for _attempt in range(MAX_EMPTY_ROUNDS):  # a round where every group ties yields nothing: sample again
            if self._fewest_pairs_on_any_rank() > 0:
                break
            samples = self.stream.next_batch(cfg.algorithm.iterative_dpo.round_prompts)
            seed = derive_seed(cfg.training.seed, "iterative_dpo.round", self.round, self.learner.accelerator.process_index)
            rollout = RolloutBatch.from_groups(
                samples, generate_groups(self.learner, self.engine, samples, k,
                                         SamplingSettings.from_config(cfg.rollout, seed=seed)),
                policy_version=self.step)
            batch = self.rewards.score_groups(rollout.samples, rollout.grouped_completions())
            ties = 0
            for _, sample, rows in rollout.groups():
                pick = best_and_worst(batch.total[rows])
                if pick is None:
                    ties += 1
                    continue
                group = rollout.completions[rows]
                self.buffer.append((sample, group[pick[0]].token_ids, group[pick[1]].token_ids))
            self.round += 1
            self.round_stats = {"iterative/round": float(self.round), "iterative/pairs": float(len(self.buffer)),
                                "iterative/skipped_ties": float(ties),
                                "iterative/reward_mean": float(torch.nanmean(batch.total)), **self.rewards.metrics()}
        fewest = self._fewest_pairs_on_any_rank()
        if fewest > 0:
            # every rank trains the same number of steps per round (their collectives must line up)
            per_step = cfg.training.prompts_per_step
            target = max(per_step, fewest // per_step * per_step)
            self.buffer = (self.buffer * (target // len(self.buffer) + 1))[:target]
            return
        raise RuntimeError(f"iterative DPO: every response group tied on its rewards in {MAX_EMPTY_ROUNDS} rounds of "
                           f"{cfg.algorithm.iterative_dpo.round_prompts} prompts, so there is no preference to learn; check the "
                           "rewards (rewards/*) or raise rollout.temperature / rollout.num_generations")

    def _fewest_pairs_on_any_rank(self) -> int:
        acc = self.learner.accelerator
        count = torch.tensor([len(self.buffer)], device=acc.device)
        return int(acc.gather(count).min())

    def next_pairs(self) -> PreferenceBatch:
        if not self.buffer:
            self.new_round()
        take, self.buffer = self.buffer[:self.cfg.training.prompts_per_step], self.buffer[self.cfg.training.prompts_per_step:]
        return PreferenceBatch(samples=[s for s, _, _ in take], chosen=[c for _, c, _ in take],
                               rejected=[r for _, _, r in take])

    def train_step(self) -> dict[str, float]:
        metrics = super().train_step()
        metrics.update(self.round_stats)
        return metrics

    def trainer_state(self) -> dict[str, Any]:
        """The round counter and every rank's pairs still to train on (as row index + token ids), so a
        run resumed mid-round finishes that round's pairs instead of sampling a new round."""
        from accelerate.utils import gather_object

        mine = [[sample.index, chosen, rejected] for sample, chosen, rejected in self.buffer]
        return {**super().trainer_state(), "iterative": {
            "round": self.round, "round_stats": self.round_stats, "pairs_by_rank": gather_object([mine])}}

    def after_resume(self, state: dict[str, Any]) -> None:
        saved = state.get("iterative")
        if saved is None:
            return
        self.round, self.round_stats = int(saved["round"]), dict(saved["round_stats"])
        rank, by_rank = self.learner.accelerator.process_index, saved["pairs_by_rank"]
        if len(by_rank) != self.learner.accelerator.num_processes:
            raise RuntimeError(f"iterative DPO checkpoint holds pairs of {len(by_rank)} processes but this run has "
                               f"{self.learner.accelerator.num_processes}; resume with the same number of processes")
        self.buffer = []
        for index, chosen, rejected in by_rank[rank]:
            # built straight from the row: these rows were already prepared (and counted) before the save
            sample = self.stream.builder.prepare(self.stream.rows[int(index)], int(index))
            self.buffer.append((sample, list(chosen), list(rejected)))

    def close(self) -> None:
        self.engine.close()


@register_trainer("iterative_dpo")
def train_iterative_dpo(cfg: RecipeConfig) -> Path:
    return IterativeDPOTrainer(cfg).train()
