"""GRPO for image and video prompts: rollouts -> rewards -> group advantages -> mu updates -> weights.

One learner serves every back-end (single process, DDP, ZeRO-2/3, LoRA); the math lives in
``losses.py``, the scoring in ``grouped_forward.py``, the back-end plumbing in ``backend.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from r1_mm.config.recipe import ConfigError, RecipeConfig, RewardSpec, clip_against
from r1_mm.core.seeds import derive_seed
from r1_mm.data import Sample
from r1_mm.data.loading import has_split
from r1_mm.data.media import media_preview
from r1_mm.data.turns import TrajectoryBuilder
from r1_mm.models.forward.scoring import score_completions
from r1_mm.models.forward.truncated_scores import Truncation
from r1_mm.rewards.reward_metrics import metric_labels, reward_metrics
from r1_mm.rewards.runner import RewardBatch, RewardRunner
from r1_mm.rollout.agentic import ToolRollout, accuracy_by_call
from r1_mm.rollout.base import Completion, RolloutEngine, SamplingSettings, media_token_ids
from r1_mm.rollout.batch import RolloutBatch
from r1_mm.rollout.engines import make_engine
from r1_mm.rollout.records import append_rows, sampled_groups, scored_rows
from r1_mm.trainers import temporal_contrast
from r1_mm.trainers.async_rollouts import AsyncRollouts
from r1_mm.trainers.backend import (
    accumulation_cycle,
    backward_share,
    generate_groups,
    micro_batches,
    optimizer_step,
    packed_tokens,
    reference_model,
    sync_reference,
)
from r1_mm.trainers.base import BaseTrainer
from r1_mm.trainers.length_bonus import length_band_bonus
from r1_mm.trainers.losses import ADVANTAGE_ESTIMATORS, LossNorm, LossSettings, policy_loss
from r1_mm.trainers.objects import RunObjects, with_objects
from r1_mm.trainers.registry import register_trainer
from r1_mm.trainers.rollout_correction import importance_weights, sampler_anchor, sampling_logprobs
from r1_mm.trainers.step_metrics import StepMetrics

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; a checkpoint was saved before stopping."""


@dataclass
class Experience:
    """One step's rollouts as the learner sees them: the :class:`RolloutBatch` (what was sampled, by
    which policy, in which groups) plus what the learner derived from it, one value per completion in
    the batch's row order (rewards, advantages).

    Kept apart from the batch because the batch is what an engine produces and could be produced
    ahead of the learner (asynchronous rollouts), while rewards and advantages belong to the step that
    consumes it."""

    batch: RolloutBatch
    rewards: RewardBatch
    advantages: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    group_std_zero: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def samples(self) -> list[Sample]:
        return self.batch.samples

    @property
    def completions(self) -> list[Completion]:
        return self.batch.completions

    def select(self, prompts: Sequence[int]) -> Experience:
        """The given prompts' share (a micro-batch), every per-completion value taken along (values not
        computed yet, still empty, stay empty)."""
        rows = self.batch.rows_of(prompts)

        def take(values: torch.Tensor) -> torch.Tensor:
            return values[rows] if len(values) else values

        rewards = dataclasses.replace(self.rewards, per_function=take(self.rewards.per_function),
                                      total=take(self.rewards.total))
        return Experience(batch=self.batch.select(prompts), rewards=rewards, advantages=take(self.advantages),
                          group_std_zero=take(self.group_std_zero))


def flat_groups(totals: torch.Tensor, batch: RolloutBatch) -> list[bool]:
    """Per group: do all its rewards agree (None counted as 0)? Such groups carry no GRPO signal, and
    neither does a group of one completion."""
    return [rows.stop - rows.start < 2 or bool(torch.nan_to_num(totals[rows], nan=0.0).std() == 0)
            for _, _, rows in batch.groups()]


@dataclass
class PartialStep:
    """A step's rollouts in the making (partial rollouts): its prompts, each completion so far (tokens, sampler
    logprobs, each token's version) and the version of each sampling segment."""

    step: int
    samples: list[Sample]
    groups: list[list[Completion]]
    segments: list[int]

    def __post_init__(self) -> None:
        self.sample_of = {id(c): s for s, group in zip(self.samples, self.groups, strict=True) for c in group}
        self.with_token_types = any("mm_token_type_ids" in s.inputs for s in self.samples)

    @staticmethod
    def unfinished(c: Completion, limit: int) -> bool:
        """Stopped at a segment's budget: no end-of-sequence token yet, and room left."""
        return c.truncated and len(c.token_ids) < limit


class GRPOTrainer(BaseTrainer):
    name = "grpo"

    def __init__(self, cfg: RecipeConfig | dict | str, *, model: Any = None, processor: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None, reward_funcs: Any = None):
        """``cfg``: a RecipeConfig, a dict of recipe sections or a recipe YAML path; the keywords take
        Python objects instead of the recipe's names (see ``r1_mm.trainers.objects``)."""
        objects = RunObjects(model, processor, train_dataset, eval_dataset, reward_funcs)
        cfg = with_objects(cfg, objects)
        torch.manual_seed(cfg.training.seed)
        if not cfg.rewards.functions:
            raise ConfigError("rewards.functions is empty: GRPO needs at least one reward (or reward_funcs=)")
        super().__init__(cfg, need_reference=cfg.algorithm.grpo.beta != 0.0, objects=objects)
        cfg = self.cfg
        self.suppressed_ids = media_token_ids(self.learner.unwrapped.config)
        self.rewards = RewardRunner.from_recipe(cfg)
        self.engine: RolloutEngine = make_engine(cfg.rollout.engine, model=self.learner.unwrapped,
                                                 processor=self.processor, cfg=cfg)
        if cfg.tools.functions:  # agentic: the recipe's tools run between the engine's turns
            self.engine = ToolRollout(self.engine, self.processor, cfg.tools, cfg.media)
        if model is not None and not getattr(self.engine, "samples_from_policy", False):
            self.engine.update_weights(self.learner.unwrapped)  # it loaded the path: sample from the object's weights
        self.temporal_rewards = None
        if cfg.algorithm.grpo.temporal_contrast:
            # the shuffled group is scored by the recipe's own spec of that reward (kwargs included)
            spec = next((f for f in cfg.rewards.functions if f.name == cfg.algorithm.grpo.temporal_reward),
                        RewardSpec(name=cfg.algorithm.grpo.temporal_reward))
            self.temporal_rewards = RewardRunner.from_recipe(cfg, [spec])
        a = cfg.algorithm.grpo
        self.loss_settings = LossSettings(
            loss_type=a.loss_type, epsilon_low=a.epsilon,
            epsilon_high=a.epsilon_high if a.epsilon_high is not None else a.epsilon, beta=a.beta,
            importance_sampling_level=a.importance_sampling_level,
            max_completion_length=cfg.rollout.max_completion_length,
            kl_importance_weighting=a.kl_importance_weighting, sapo_temperature_pos=a.sapo_temperature_pos,
            sapo_temperature_neg=a.sapo_temperature_neg, entropy_coef=a.entropy_coef,
            top_entropy_quantile=a.top_entropy_quantile)
        self.clip_against = clip_against(cfg)  # the PPO ratio's anchor: the learner at the step's start or the sampler
        self.nonfinite_in_a_row = 0
        self._warned_no_sampler_logprobs = False
        self._last_exp: Experience | None = None
        self._eval_samples: list[Sample] | None = None
        # asynchronous rollouts (r1_mm.trainers.async_rollouts): the staleness bound K, None = the synchronous loop;
        # the producer is built at the first step (after a resume, at the step resumed from)
        # (one learner process only: more are refused by preflight, before the model loads)
        self.async_staleness: int | None = cfg.rollout.max_staleness or None
        self.async_rollouts: AsyncRollouts | None = None
        self._checkpoint_steps = 0
        self._last_step_end: float | None = None
        self._token_staleness: list[int] = []

    def run_info_extra(self) -> dict[str, Any]:
        return {"clip_against": self.clip_against, "max_staleness": self.cfg.rollout.max_staleness}

    # -- rollouts ---------------------------------------------------------------------------------
    def _sampling(self, step: int, *stream: int | str) -> SamplingSettings:
        """Step ``step``'s rollout seed on this process (the step the batch is for, which asynchronous rollouts
        sample ahead of the learner); ``stream`` names an extra rollout of the step (temporal contrast's
        shuffled-frame groups), which must not replay the main one."""
        seed = derive_seed(self.cfg.training.seed, "grpo.rollout", step,
                           self.learner.accelerator.process_index, *stream)
        return SamplingSettings.from_config(self.cfg.rollout, seed=seed)

    def _generate(self, samples: list[Sample], n: int, step: int, *stream: int | str) -> list[list[Completion]]:
        return generate_groups(self.learner, self.engine, samples, n, self._sampling(step, *stream))

    def _temporal_bonus(self, rollout: RolloutBatch, rewards: RewardBatch, step: int) -> dict[str, float]:
        a = self.cfg.algorithm.grpo
        col = rewards.names.index(a.temporal_reward) if a.temporal_reward in rewards.names else None
        bonus_total, video_prompts, earned = torch.zeros(len(rollout)), 0, 0
        for i, sample, rows in rollout.groups():
            if not temporal_contrast.has_video(sample):
                continue
            video_prompts += 1
            n_shuffled = a.temporal_num_shuffled or max(1, (rows.stop - rows.start) // 2)  # half the ordered group
            rank = self.learner.accelerator.process_index
            shuffled = temporal_contrast.shuffled_frames_sample(
                sample, self.processor, seed=derive_seed(self.cfg.training.seed, "grpo.temporal_shuffle", step, rank, i))
            shuffled_group = self._generate([shuffled], n_shuffled, step, "temporal", i)[0]
            shuffled_scores = self.temporal_rewards.score_groups([shuffled], [shuffled_group]).per_function[:, 0]
            ordered_scores = (rewards.per_function[rows, col] if col is not None else
                              self.temporal_rewards.score_groups([sample], [rollout.completions[rows]])
                              .per_function[:, 0])
            thr = a.temporal_correct_threshold
            bonus = temporal_contrast.temporal_bonus(torch.nan_to_num(ordered_scores) >= thr,
                                                     torch.nan_to_num(shuffled_scores) >= thr,
                                                     bonus=a.temporal_bonus, margin=a.temporal_margin)
            earned += int(bonus.sum() > 0)
            bonus_total[rows] = bonus
        rewards.add_bonus(bonus_total)
        return {"temporal/video_prompts": video_prompts,
                "temporal/bonus_rate": earned / video_prompts if video_prompts else 0.0}

    def _rollout(self, samples: list[Sample], step: int,
                 version: int) -> tuple[RolloutBatch, RewardBatch, dict[str, float]]:
        """Step ``step``'s G completions per prompt from the engine's weights (version ``version``: ``step``
        when synchronous), scored (with T-GRPO's and the length bonus)."""
        return self._scored(self._batch(samples, self._generate(samples, self.cfg.rollout.num_generations, step),
                                        version), step)

    def _batch(self, samples: list[Sample], groups: list[list[Completion]], version: int) -> RolloutBatch:
        """The batch of ``groups``; a completion whose tokens carry versions (partial rollouts) gets its oldest."""
        acc = self.learner.accelerator
        rollout = RolloutBatch.from_groups(
            samples, groups, policy_version=version,
            first_group=acc.process_index * self.cfg.training.prompts_per_step,  # group ids unique across processes
            mask_truncated=self.cfg.algorithm.grpo.mask_truncated_completions)
        if any(c.token_versions for c in rollout.completions):
            oldest = [min(c.token_versions) if c.token_versions else version for c in rollout.completions]
            rollout = dataclasses.replace(rollout, policy_version=torch.tensor(oldest, dtype=torch.long))
        return rollout

    def _scored(self, rollout: RolloutBatch, step: int) -> tuple[RolloutBatch, RewardBatch, dict[str, float]]:
        """A sampled batch scored (with T-GRPO's and the length bonus)."""
        rewards = self.rewards.score_groups(rollout.samples, rollout.grouped_completions())
        stats: dict[str, float] = dict(getattr(self.engine, "stats", {}))  # agentic: tool calls, turns, errors
        if rollout.has_tool_turns and self.cfg.tools.accuracy_reward in rewards.names:
            scores = rewards.per_function[:, rewards.names.index(self.cfg.tools.accuracy_reward)].tolist()
            stats.update(accuracy_by_call([None if v != v else v > 0.5 for v in scores],
                                          [c.trajectory is not None and c.trajectory.executed_calls > 0
                                           for c in rollout.completions]))
        if self.temporal_rewards is not None:
            stats.update(self._temporal_bonus(rollout, rewards, step))
        if self.cfg.algorithm.grpo.length_bonus:
            stats.update(self._length_bonus(rollout, rewards))
        return rollout, rewards, stats

    def _length_bonus(self, rollout: RolloutBatch, rewards: RewardBatch) -> dict[str, float]:
        """Video-R1's length control, added to the total after the rewards (and T-GRPO's bonus)."""
        a = self.cfg.algorithm.grpo
        col = rewards.names.index(a.length_bonus_reward)
        bonus = torch.zeros_like(rewards.total)
        for _, _, rows in rollout.groups():
            scores = torch.nan_to_num(rewards.per_function[rows, col])
            lengths = torch.tensor([len(c.token_ids) for c in rollout.completions[rows]])
            bonus[rows] = length_band_bonus(
                scores > a.length_bonus_threshold, lengths, bonus=a.length_bonus,
                min_tokens=a.length_bonus_min_tokens, max_tokens=a.length_bonus_max_tokens)
        rewards.add_bonus(bonus)
        return {"length_bonus/rate": float((bonus > 0).float().mean())}

    def collect(self, step: int | None = None, version: int | None = None) -> Experience:
        """Sample step ``step``'s batch (default: the current one) with the engine's weights (version
        ``version``, default ``step``); with dynamic sampling, replace groups whose rewards all agree (DAPO)."""
        cfg = self.cfg
        step = self.step if step is None else step
        version = step if version is None else version
        samples = self.stream.next_batch(cfg.training.prompts_per_step)
        rollout, rewards, stats = self._rollout(samples, step, version)
        resampled = 0
        if cfg.algorithm.grpo.dynamic_sampling:
            for _ in range(cfg.algorithm.grpo.max_resample_rounds):
                flat = flat_groups(rewards.total, rollout)
                if not any(flat):
                    break
                drop = [i for i, f in enumerate(flat) if f]
                new_rollout, new_rewards, _ = self._rollout(self.stream.next_batch(len(drop)), step, version)
                resampled += len(drop)
                new_flat = flat_groups(new_rewards.total, new_rollout)
                # informative new groups replace flat old ones; the rest keep the old (flat) groups
                replacements = [j for j, f in enumerate(new_flat) if not f]
                rollout, take = rollout.replace_groups(list(zip(drop, replacements, strict=False)), new_rollout)
                rewards.per_function = torch.cat([rewards.per_function, new_rewards.per_function])[take]
                rewards.total = torch.cat([rewards.total, new_rewards.total])[take]
        stats["dynamic_sampling/resampled_groups"] = resampled
        return Experience(batch=rollout, rewards=rewards, stats=stats)

    def compute_advantages(self, exp: Experience) -> None:
        """Advantages over the groups of every process (``batch`` scaling needs them all); a group never
        spans processes, and the step-global group ids keep each process's groups apart."""
        acc = self.learner.accelerator
        gathered = acc.gather(exp.rewards.total.to(acc.device)).cpu()
        group_ids = acc.gather(exp.batch.group_ids.to(acc.device)).cpu()
        est = ADVANTAGE_ESTIMATORS.get(self.cfg.algorithm.grpo.advantage_estimator)
        adv = est(gathered, group_ids, scale=self.cfg.algorithm.grpo.scale_rewards)
        mine = torch.isin(group_ids, exp.batch.group_ids)  # this process's completions, in its own order
        exp.advantages = adv.values[mine]
        exp.group_std_zero = adv.group_std_zero[mine]
        exp.stats["rewards/gathered_mean"] = float(torch.nanmean(gathered))

    # -- update -------------------------------------------------------------------------------------
    def _score(self, model: torch.nn.Module, exp: Experience, with_entropy: bool = False, truncated: bool = True,
               with_full_logps: bool = False):
        """Logprobs under the sampling distribution (temperature, suppressed tokens and, when ``truncated``,
        the sampler's top-p / top-k kept set): what the engines report, so the ratios compare like with
        like. The KL term uses the untruncated distribution on both sides (docs/sampling.md)."""
        r = self.cfg.rollout
        return score_completions(model, exp.samples, exp.batch.token_ids, exp.batch.uniform_group_size,
                                 self.pad_id, temperature=max(self.cfg.rollout.temperature, 1e-6),
                                 mode=self.cfg.training.forward_mode, with_entropy=with_entropy,
                                 suppressed_ids=self.suppressed_ids,
                                 truncation=Truncation(r.top_p, r.top_k) if truncated else None,
                                 with_full_logps=with_full_logps,
                                 contexts=exp.batch.contexts if exp.batch.has_tool_turns else None)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=self.learner.accelerator.device)
        return float(self.learner.accelerator.reduce(flag, reduction="sum")) == 0.0

    def _sampler_logps(self, exp: Experience, learner_logps: torch.Tensor) -> torch.Tensor:
        """The engine's sampling logprobs (N, C), which clip_against: sampler cannot do without."""
        sampler = sampling_logprobs(exp.batch.sampler_logprobs, learner_logps.shape[1], learner_logps.device)
        if sampler is None:
            raise RuntimeError(f"rollout engine {self.engine.name} returned no sampling logprobs: "
                               "algorithm.grpo.clip_against=sampler takes the PPO ratio against them")
        return sampler

    def _rollout_correction(self, exp: Experience, learner_logps: torch.Tensor,
                            mask: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Truncated IS weights between the engine's sampling logprobs and the learner's (None = off)."""
        a = self.cfg.algorithm.grpo
        if a.rollout_is == "none":
            return None, {}
        sampler = sampling_logprobs(exp.batch.sampler_logprobs, learner_logps.shape[1], learner_logps.device)
        if sampler is None:
            if self.async_rollouts is not None:
                raise RuntimeError(f"rollout engine {self.engine.name} returned no sampling logprobs: asynchronous "
                                   "rollouts (rollout.max_staleness > 0) cannot correct their staleness without them")
            if not self._warned_no_sampler_logprobs:
                log.warning("rollout engine %s returns no sampling logprobs: rollout_is correction is off",
                            self.engine.name)
                self._warned_no_sampler_logprobs = True
            return None, {}
        return importance_weights(learner_logps, sampler, mask, a.rollout_is, a.rollout_is_cap, a.rollout_is_floor)

    def _entropy_pool(self, entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """Every process's scored-token entropies of this micro-batch, for top_entropy_quantile's threshold
        (TRL's get_high_entropy_mask); None when it is off. A collective: every process calls it."""
        if self.loss_settings.top_entropy_quantile >= 1.0:
            return None
        acc = self.learner.accelerator
        local = entropy.detach()[mask.bool()].float()
        if acc.num_processes == 1:
            return local
        pad = -1e9  # entropies are >= 0: the padding cannot be a value
        gathered = acc.gather(acc.pad_across_processes(local, dim=0, pad_index=pad))
        return gathered[gathered != pad]

    def _group_tokens(self, exp: Experience) -> list[int]:
        """Per prompt group, the tokens the learner's forward packs for it (the micro-batch budget's unit)."""
        return [packed_tokens(sample.num_prompt_tokens, [len(c.token_ids) for c in exp.completions[rows]],
                              self.cfg.training.forward_mode) for _, sample, rows in exp.batch.groups()]

    def _step_norm(self, exp: Experience) -> LossNorm:
        """The whole step's denominators, from the loss mask alone (known before any forward)."""
        acc = self.learner.accelerator
        lengths = exp.batch.loss_mask.sum(-1).to(dtype=torch.float, device=acc.device)
        local = lengths.sum()
        items = float(acc.gather(local.reshape(1)).sum()) / acc.num_processes
        return LossNorm(sequences=float(len(exp.completions)), tokens=float(local), items=items)

    def _nonfinite(self, micro_index: int) -> None:
        """Skip the step (its gradients are dropped); after max_nonfinite_steps in a row, save and stop.

        Under DeepSpeed, gradients of earlier micro-batches already sit in the engine's buffers, where
        they cannot be dropped: a non-finite micro-batch after the first one saves and stops at once."""
        learner, cfg = self.learner, self.cfg
        self.nonfinite_in_a_row += 1
        learner.optimizer.zero_grad(set_to_none=True)
        log.warning("step %d: non-finite loss (%d in a row); update skipped", self.step, self.nonfinite_in_a_row)
        stuck_in_engine = learner.is_deepspeed and micro_index > 0
        if self.nonfinite_in_a_row >= cfg.training.max_nonfinite_steps or stuck_in_engine:
            path = self.save()
            why = (f"a non-finite loss in micro-batch {micro_index} under DeepSpeed gradient accumulation"
                   if stuck_in_engine else f"{self.nonfinite_in_a_row} consecutive non-finite losses")
            raise NonFiniteLossError(f"{why} at step {self.step}; checkpoint saved to {path}")

    def update(self, exp: Experience) -> dict[str, float]:
        cfg, learner = self.cfg, self.learner
        acc = learner.accelerator
        policy = learner.policy
        split = micro_batches(cfg, self._group_tokens(exp), acc)
        micro = [exp.select(r) for r in split]
        norm = self._step_norm(exp)
        old_logps: list[torch.Tensor | None] = [None] * len(micro)
        ref_logps: list[torch.Tensor | None] = [None] * len(micro)
        with torch.no_grad():
            for k, part in enumerate(micro):
                if cfg.algorithm.grpo.num_iterations > 1:
                    old_logps[k] = self._score(policy, part)[0]
                if cfg.algorithm.grpo.beta != 0.0:
                    with reference_model(learner) as ref:
                        ref_logps[k] = self._score(ref, part, truncated=False)[0]
        is_weights: list[torch.Tensor | None] = [None] * len(micro)
        anchors: list[torch.Tensor | None] = [None] * len(micro)  # clip_against sampler: the ratio's old logprobs
        sums = StepMetrics()
        for iteration in range(cfg.algorithm.grpo.num_iterations):
            policy.train()
            skipped = False
            with accumulation_cycle(learner, len(micro)):
                for k, part in enumerate(micro):
                    with acc.accumulate(policy):
                        logps, entropy, _, kl_logps = self._score(policy, part, with_entropy=True,
                                                                  with_full_logps=True)
                        mask = part.batch.loss_mask.to(acc.device)  # the scorer's completion mask, truncation applied
                        behaviour = old_logps[k] if old_logps[k] is not None else logps.detach()
                        if iteration == 0:
                            is_weights[k], is_stats = self._rollout_correction(part, behaviour, mask)
                            sums.add_means(is_stats, weight=float(mask.sum()))
                            if self.clip_against == "sampler":
                                anchors[k], is_weights[k] = sampler_anchor(
                                    behaviour, self._sampler_logps(part, behaviour), mask, is_weights[k])
                        if anchors[k] is not None:
                            behaviour = anchors[k]
                        out = policy_loss(logps, behaviour, part.advantages.to(acc.device), mask, self.loss_settings,
                                          ref_logps=ref_logps[k], token_weights=is_weights[k], norm=norm,
                                          kl_logps=kl_logps, entropy=entropy,
                                          entropy_pool=self._entropy_pool(entropy, mask))
                        if not self._all_finite(out.loss):
                            self._nonfinite(k)
                            skipped = True
                            break
                        backward_share(learner, out.loss)
                        if iteration == 0:
                            sums.add_sum("train/loss", float(out.loss.detach()))
                            sums.add_token_means(mask, **{"train/entropy": entropy, "train/kl": out.per_token_kl,
                                                          "train/clip_ratio_low": out.clipped_low,
                                                          "train/clip_ratio_high": out.clipped_high,
                                                          "train/high_entropy_ratio": out.entropy_mask})
            if skipped:
                sums.set("train/nonfinite_skipped", 1.0)
                break
            self.nonfinite_in_a_row = 0
            grad_norm = optimizer_step(learner, cfg.training.max_grad_norm)
            if iteration == 0:
                sums.set("train/grad_norm", grad_norm if grad_norm is not None else float("nan"))
                sums.set("train/lr", float(learner.scheduler.get_last_lr()[0]))
        metrics = {**sums.result(), **split.metrics()}
        if "train/loss" in metrics:
            metrics.setdefault("train/kl", 0.0)  # beta = 0: no KL term
        self._sync_weights()
        if cfg.algorithm.grpo.ref_sync_steps and (self.step + 1) % cfg.algorithm.grpo.ref_sync_steps == 0:
            sync_reference(learner, cfg.algorithm.grpo.ref_sync_mix_alpha)
        return metrics

    def _sync_weights(self) -> None:
        """The updated weights to the engine (asynchronous: between two of the producer's generate calls,
        and the producer may then start the steps the new version allows)."""
        if self.async_rollouts is None:
            self.engine.update_weights(self.learner.unwrapped)
        else:
            self.async_rollouts.push(lambda: self.engine.update_weights(self.learner.unwrapped))

    # -- asynchronous rollouts ----------------------------------------------------------------------
    def _start_async(self, max_staleness: int) -> AsyncRollouts:
        def produce(step: int, version: int) -> Experience:
            return self.collect(step, version)

        concurrent = bool(getattr(self.engine, "generates_beside_learner", False))
        hooks: dict[str, Any] = {}
        if self.cfg.rollout.partial_rollout_tokens is not None:
            if not hasattr(self.engine, "continue_trajectory"):
                raise ConfigError(f"rollout.partial_rollout_tokens: rollout engine {self.engine.name} cannot continue "
                                  "a completion from its token ids")
            hooks = {"advance": self._advance_partial, "finish": self._finish_partial}
            produce = self._start_partial  # type: ignore[assignment]
        self.async_rollouts = AsyncRollouts(
            produce, self.stream.state_dict, first_step=self.step, max_steps=self.cfg.training.max_steps,
            max_staleness=max_staleness, concurrent=concurrent, timeout_s=self.cfg.rollout.async_wait_timeout_s,
            **hooks)
        if self.learner.accelerator.is_main_process:
            log.info("asynchronous rollouts: max_staleness %d, PPO ratio against the %s, %s", max_staleness,
                     self.clip_against,
                     "concurrent producer thread" if concurrent else "interleaved with the learner's updates")
        return self.async_rollouts

    # -- partial rollouts (rollout.partial_rollout_tokens) ---------------------------------------------
    def _segment(self, partial: PartialStep, version: int, budget: int | None) -> None:
        """Continue every unfinished completion of ``partial`` by at most ``budget`` new tokens (None: to the end),
        sampled by version ``version``; each token keeps the version that sampled it."""
        limit = self.cfg.rollout.max_completion_length
        going = [c for group in partial.groups for c in group if partial.unfinished(c, limit)]
        if not going:
            return
        sampling = self._sampling(partial.step, "partial", version, len(partial.segments))
        items = []
        for c in going:
            builder = TrajectoryBuilder(with_token_types=partial.with_token_types)
            builder.add_model_turn(c.token_ids, c.logprobs)
            left = limit - len(c.token_ids)
            items.append((partial.sample_of[id(c)], builder.ids, builder.context(),
                          left if budget is None else min(budget, left)))
        batched = getattr(self.engine, "continue_trajectories", None)
        if callable(batched):
            turns = batched(items, sampling)
        else:
            turns = [self.engine.continue_trajectory(s, ids, ctx, sampling, n) for s, ids, ctx, n in items]
        for c, turn in zip(going, turns, strict=True):
            c.token_ids = c.token_ids + turn.token_ids
            c.logprobs = (c.logprobs or []) + (turn.logprobs or [])
            c.token_versions = (c.token_versions or []) + [version] * len(turn.token_ids)
            c.truncated = turn.truncated
            c.text = self.processor.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        partial.segments.append(version)

    def _start_partial(self, step: int, version: int) -> PartialStep:
        """Step ``step``'s prompts drawn and each completion's first ``partial_rollout_tokens`` sampled."""
        samples = self.stream.next_batch(self.cfg.training.prompts_per_step)
        sampling = dataclasses.replace(self._sampling(step), max_tokens=self.cfg.rollout.partial_rollout_tokens)
        groups = generate_groups(self.learner, self.engine, samples, self.cfg.rollout.num_generations, sampling)
        for group in groups:
            for c in group:
                c.token_versions = [version] * len(c.token_ids)
        return PartialStep(step, samples, groups, [version])

    def _advance_partial(self, partial: PartialStep, version: int) -> None:
        self._segment(partial, version, self.cfg.rollout.partial_rollout_tokens)

    def _finish_partial(self, partial: PartialStep, version: int) -> Experience:
        """The batch the learner takes: its unfinished completions sampled to the end by the current weights,
        then scored."""
        self._segment(partial, version, None)
        rollout, rewards, stats = self._scored(self._batch(partial.samples, partial.groups, partial.segments[0]),
                                               partial.step)
        continued = [len(set(c.token_versions or [])) > 1 for c in rollout.completions]
        stats.update({"async/partial_continued_frac": sum(continued) / max(len(continued), 1),
                      "dynamic_sampling/resampled_groups": 0})
        return Experience(batch=rollout, rewards=rewards, stats=stats)

    def save(self, steps_done: int | None = None) -> Path:
        self._checkpoint_steps = self.step if steps_done is None else steps_done
        return super().save(steps_done)

    # -- loop -----------------------------------------------------------------------------------
    def rollout_metrics(self, exp: Experience) -> dict[str, float]:
        lengths = torch.tensor([len(c.token_ids) for c in exp.completions], dtype=torch.float)
        labels = metric_labels(exp.rewards.names)
        types = [s.row.get("problem_type") for s in exp.batch.completion_samples]
        out = {
            **reward_metrics(exp.rewards.per_function, exp.rewards.total, labels, types),
            "rewards/total_std": float(torch.nan_to_num(exp.rewards.total).std()) if len(exp.completions) > 1 else 0.0,
            "rewards/frac_zero_std_groups": float(exp.group_std_zero.float().mean()),
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/truncated_ratio": sum(c.truncated for c in exp.completions) / len(exp.completions),
            # tokens the engine prefilled for this step's rollouts (every sample of a group counts its prompt)
            "rollout/prefill_tokens": float(sum(s.num_prompt_tokens for s in exp.batch.completion_samples)),
        }
        for name, label in zip(exp.rewards.names, labels, strict=True):
            if self.rewards.failure_counts.get(name):
                out[f"rewards/{label}/failures"] = self.rewards.failure_counts[name]
        out.update(self.rewards.metrics())
        return out

    def log_completions(self, exp: Experience) -> None:
        """Every group of the step (or a ``logging.completions_sample_rate`` share), every process's,
        to completions.jsonl (see ``r1_mm.rollout.records``); the first group also to W&B's table."""
        from accelerate.utils import gather_object

        acc = self.learner.accelerator
        picked = sampled_groups(len(exp.samples), self.cfg.logging.completions_sample_rate,
                                seed=derive_seed(self.cfg.training.seed, "completion_log", self.step, acc.process_index))
        rows = scored_rows(self.step, exp.batch, exp.rewards.per_function, exp.rewards.total, exp.advantages,
                           metric_labels(exp.rewards.names), picked, image_dir=self.run_dir / "tool_images")
        rows = gather_object(rows)  # a collective: every process calls it, the main one writes
        if not acc.is_main_process:
            return
        append_rows(self.run_dir / "completions.jsonl", rows)
        if self.step % self.cfg.logging.table_steps == 0:
            sample = exp.samples[0]
            first = scored_rows(self.step, exp.batch, exp.rewards.per_function, exp.rewards.total,
                                exp.advantages, [], [0])
            tool_images = [[im for turn in c.trajectory.turns for im in turn.images] if c.trajectory else []
                           for c in exp.batch.completions[exp.batch.rows(0)]]
            self.metrics.log_completions_table([{**r, "media": media_preview(sample), "tool_images": images}
                                                for r, images in zip(first, tool_images, strict=True)], self.step)

    def trainer_state(self) -> dict:
        state = {**super().trainer_state(), "nonfinite_in_a_row": self.nonfinite_in_a_row,
                 "reward_failures": dict(self.rewards.failure_counts)}
        if self.async_rollouts is not None:  # the stream is ahead of the learner: resume before the untrained prompts
            state["data"] = self.async_rollouts.data_state(self._checkpoint_steps)
        return state

    def after_resume(self, state: dict) -> None:
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        for name, count in state.get("reward_failures", {}).items():
            if name in self.rewards.failure_counts:
                self.rewards.failure_counts[name] = count
        if not getattr(self.engine, "samples_from_policy", False):
            self.engine.update_weights(self.learner.unwrapped)  # the engine still holds the starting weights

    def run_eval(self) -> dict[str, float]:
        """The eval split with the training rewards (greedy unless training.eval_samples > 1)."""
        from r1_mm.trainers.evaluation import eval_rows, evaluate

        acc = self.learner.accelerator
        if self._eval_samples is None:
            self._eval_samples = eval_rows(self.cfg, self.processor, shard=(acc.process_index, acc.num_processes),
                                           dataset=self.objects.eval_dataset)
        if self.async_rollouts is not None and self.async_rollouts.concurrent:
            with self.async_rollouts.engine("eval"):  # not while the producer samples
                return evaluate(self.engine, self._eval_samples, self.rewards, self.cfg, learner=self.learner)
        return evaluate(self.engine, self._eval_samples, self.rewards, self.cfg, learner=self.learner)

    def train_step(self) -> dict[str, float]:
        t0 = time.time()
        if self._last_step_end is None:
            self._last_step_end = t0
        produced = None
        if self.async_staleness is not None:
            if self.async_rollouts is None:
                self._start_async(self.async_staleness)
            produced = self.async_rollouts.take(self.step)
            exp = produced.value
        else:
            exp = self.collect()
        self.compute_advantages(exp)
        t_rollout = time.time() - t0
        metrics = self.rollout_metrics(exp)
        metrics.update(exp.stats)
        metrics.update(self.update(exp))
        # what the last weight sync sent (vllm engines: the adapter alone with rollout.weight_sync_lora=adapter)
        engine = getattr(self.engine, "engine", self.engine)  # under a tool rollout's wrapper
        if getattr(engine, "last_sync_bytes", None):
            metrics["sync/bytes"] = float(engine.last_sync_bytes)
        now = time.time()
        seconds = now - t0
        tokens = sum(len(c.token_ids) for c in exp.completions)
        metrics.update({"time/step_s": seconds, "time/rollout_s": t_rollout,
                        "throughput/completion_tokens_per_s": tokens / max(seconds, 1e-9),
                        # trained tokens over the wall time since the previous step ended (logging, waits included)
                        "throughput/e2e_tokens_per_s": tokens / max(now - self._last_step_end, 1e-9)})
        self._last_step_end = now
        if produced is not None:
            self._token_staleness = [self.step - v for c, version in zip(exp.completions, exp.batch.policy_version.tolist(),
                                                                         strict=True)
                                     for v in (c.token_versions or [version] * len(c.token_ids))]
            metrics.update(self.async_rollouts.step_metrics(self.step, produced, self._token_staleness))
        self._last_exp = exp
        every = self.cfg.training.eval_steps
        if every and (self.objects.eval_dataset is not None or has_split(self.cfg.data, "eval")) and ((self.step + 1) % every == 0
                                                  or self.step + 1 == self.cfg.training.max_steps):
            metrics.update(self.run_eval())
        return metrics

    def on_logged(self) -> None:
        if self._last_exp is not None:
            self.log_completions(self._last_exp)
        if self._token_staleness:  # asynchronous: the step's tokens by staleness, as a W&B histogram
            self.metrics.log_histogram("async/token_staleness", self._token_staleness, self.step)

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        out = {"reward": f"{metrics['rewards/total']:.3f}", "kl": f"{metrics.get('train/kl', 0.0):.4f}",
               "tok/s": f"{metrics.get('throughput/e2e_tokens_per_s', 0.0):.1f}"}
        if "async/staleness" in metrics:
            out.update({"stale": f"{metrics['async/staleness']:.0f}",
                        "idle": f"L{metrics['async/learner_idle_frac']:.2f}/S{metrics['async/sampler_idle_frac']:.2f}"})
        return out

    def close(self) -> None:
        if self.async_rollouts is not None:
            self.async_rollouts.close()
        self.engine.close()


@register_trainer("grpo")
def train_grpo(cfg: RecipeConfig) -> Path:
    return GRPOTrainer(cfg).train()
