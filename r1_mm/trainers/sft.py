"""Supervised fine-tuning (``algorithm: sft``): the cold start before GRPO (Video-R1: SFT on chain-of-thought
data, then T-GRPO; DeepEyes-style tool use: a few demonstrations of the call format).

Why it shares GRPO's whole path: the prompts come from the same stream (chat template, media budgets, the tools'
schemas in the system turn), a response is scored by the same grouped forward, and a tool-calling row's tool
turns are produced by the same :class:`ToolRollout` (with a :class:`ScriptedEngine` writing the row's turns),
so what SFT teaches is exactly what GRPO will see.

The loss is the token-mean NLL of the assistant's tokens over the whole step (its end-of-turn token included;
the prompt and tool turns never count). Packing: each micro-batch's rows run as one padding-free sequence (the
grouped forward with one response per prompt: every row's prompt, vision and response packed end to end).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from r1_mm.config.recipe import RecipeConfig
from r1_mm.data import Sample
from r1_mm.models.forward.scoring import score_completions
from r1_mm.rollout.agentic import ToolRollout
from r1_mm.rollout.base import Completion, SamplingSettings
from r1_mm.rollout.scripted import ScriptedEngine
from r1_mm.trainers.backend import (
    accumulation_cycle,
    backward_share,
    micro_batches,
    optimizer_step,
    packed_tokens,
)
from r1_mm.trainers.base import BaseTrainer
from r1_mm.trainers.objects import RunObjects, with_objects
from r1_mm.trainers.registry import register_trainer
from r1_mm.trainers.step_metrics import StepMetrics


class SFTDataError(ValueError):
    """An SFT row without a usable response or turns (names the row and the field)."""


class SFTTrainer(BaseTrainer):
    name = "sft"

    def __init__(self, cfg: RecipeConfig | dict | str, *, model: Any = None, processor: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None, reward_funcs: Any = None):
        """``cfg``: a RecipeConfig, a dict of recipe sections or a recipe YAML path; the keywords take Python
        objects instead of the recipe's names (see ``r1_mm.trainers.objects``). Rows need
        ``algorithm.sft.response_field`` (text) or ``turns_field`` (a list of model turns, with tools)."""
        objects = RunObjects(model, processor, train_dataset, eval_dataset, reward_funcs)
        cfg = with_objects(cfg, objects)
        torch.manual_seed(cfg.training.seed)
        super().__init__(cfg, need_reference=False, objects=objects)
        cfg = self.cfg
        self.tokenizer = self.processor.tokenizer
        self.replay: ToolRollout | None = None
        if cfg.tools.functions:  # tool turns are run exactly as a GRPO rollout runs them
            scripted = ScriptedEngine(self.processor, lambda sample: self.turns(sample))
            self.replay = ToolRollout(scripted, self.processor, cfg.tools, cfg.media)

    def close(self) -> None:
        if self.replay is not None:
            self.replay.close()

    # -- data -----------------------------------------------------------------------------------------
    def turns(self, sample: Sample) -> list[str]:
        a = self.cfg.algorithm.sft
        value = sample.row.get(a.turns_field)
        if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
            raise SFTDataError(f"row {sample.row_id}: field '{a.turns_field}' must be a non-empty list of non-empty "
                               f"strings, got {value!r}")
        return value

    def response(self, sample: Sample) -> Completion:
        """A one-turn response's ids: its text as the tokenizer writes it, then the end-of-turn token."""
        field = self.cfg.algorithm.sft.response_field
        text = sample.row.get(field)
        if not isinstance(text, str) or not text.strip():
            raise SFTDataError(f"row {sample.row_id}: field '{field}' must be a non-empty string, got {text!r}")
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [self.tokenizer.eos_token_id]
        return Completion(text=text, token_ids=ids, logprobs=None, truncated=False)

    def targets(self, samples: list[Sample]) -> tuple[list[Completion], dict[str, float]]:
        """Each row's response, or its turns with the tool turns the recipe's tools give (and the tool metrics)."""
        turns_field = self.cfg.algorithm.sft.turns_field
        with_turns = [i for i, s in enumerate(samples) if turns_field in s.row]
        out: list[Completion | None] = [None if i in with_turns else self.response(s) for i, s in enumerate(samples)]
        stats: dict[str, float] = {}
        if with_turns:
            if self.replay is None:
                raise SFTDataError(f"row {samples[with_turns[0]].row_id} has '{turns_field}' (tool-calling turns) but "
                                   "the recipe has no tools.functions to run its calls")
            sampling = SamplingSettings(max_tokens=self.cfg.rollout.max_completion_length)
            replayed = self.replay.generate([samples[i] for i in with_turns], 1, sampling)
            for i, result in zip(with_turns, replayed, strict=True):
                completion = result.completions[0]
                self._check_replay(samples[i], completion)
                out[i] = completion
            stats = dict(self.replay.stats)
        return [c for c in out if c is not None], stats

    def _check_replay(self, sample: Sample, completion: Completion) -> None:
        """The replay used every turn of the row and ended on its answer: a turn whose call failed to parse, a
        limit (tools.max_turns, max_tool_calls, max_total_tokens) or a last turn that calls would otherwise train
        on a different conversation than the row's."""
        record = completion.trajectory
        turns = self.turns(sample)
        if record is None or record.model_turns != len(turns) or record.stop_reason != "answer":
            why = record.stop_reason if record is not None else "no trajectory"
            raise SFTDataError(f"row {sample.row_id}: its {len(turns)} turns replayed as "
                               f"{record.model_turns if record else 0} model turn(s), stopped by {why}; every turn but "
                               "the last must make tool calls within tools.max_turns / max_tool_calls / "
                               "max_total_tokens, and the last must answer")
        failed = [c for c in record.calls if c["status"] != "ok"]
        if failed:
            raise SFTDataError(f"row {sample.row_id}: tool call {failed[0]['name']!r} did not run ({failed[0]['status']}: "
                               f"{failed[0]['text']}); SFT would teach a failing call")

    # -- the step -------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        samples = self.stream.next_batch(self.cfg.training.prompts_per_step)
        completions, stats = self.targets(samples)
        metrics = self.sft_update(samples, completions)
        metrics.update(stats)
        return metrics

    def sft_update(self, samples: list[Sample], completions: list[Completion]) -> dict[str, float]:
        """One optimizer step: NLL over every trained token of the step (the same token-mean whatever the
        micro-batches), accumulated over the recipe's micro-batches."""
        learner = self.learner
        acc = learner.accelerator
        contexts = [c.context for c in completions]
        trained = [sum(c.context.model_mask) if c.context is not None else len(c.token_ids) for c in completions]
        local = torch.tensor([float(sum(trained))], device=acc.device)
        total = float(acc.gather(local).sum()) / acc.num_processes  # mean tokens per process: shares sum to the mean
        sums = StepMetrics()
        split = micro_batches(self.cfg, [packed_tokens(s.num_prompt_tokens, [len(c.token_ids)], self.cfg.training.forward_mode)
                                         for s, c in zip(samples, completions, strict=True)], acc)
        learner.policy.train()
        with accumulation_cycle(learner, len(split)):
            for part in split:
                rows = list(part)
                part_contexts = [contexts[i] for i in rows]
                with acc.accumulate(learner.policy):
                    logps, entropy, mask = score_completions(
                        learner.policy, [samples[i] for i in rows], [completions[i].token_ids for i in rows], 1,
                        self.pad_id, temperature=1.0, mode=self.cfg.training.forward_mode, with_entropy=True,
                        contexts=part_contexts if any(c is not None for c in part_contexts) else None)
                    mask = mask.to(logps.dtype)
                    nll_sum = -(logps * mask).sum()
                    backward_share(learner, nll_sum / max(total, 1.0))
                sums.add_sum("train/loss", float(nll_sum.detach()) / max(total, 1.0))
                sums.add_token_means(mask, **{"train/entropy": entropy})
        grad_norm = optimizer_step(learner, self.cfg.training.max_grad_norm)
        metrics = sums.result()
        metrics.update(split.metrics())
        metrics.update({
            "train/tokens": float(sum(trained)),
            "train/grad_norm": grad_norm if grad_norm is not None else float("nan"),
            "train/lr": float(learner.scheduler.get_last_lr()[0]),
        })
        return metrics

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['train/loss']:.3f}"}


@register_trainer("sft")
def train_sft(cfg: RecipeConfig) -> Path:
    return SFTTrainer(cfg).train()
