"""Preference learning on image, multi-image and video rows: DPO and TPO (Temporal Preference
Optimization; not TRL's "Triple Preference Optimization").

A row holds a prompt with its media plus ``chosen`` and ``rejected`` responses. Both responses of a
pair share one grouped forward of the prompt and media (G = 2). TPO is this trainer with its data
(``r1-mm tpo build``) and, as in the paper, an NLL term on the chosen response (algorithm.dpo.nll_weight).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from r1_mm.config.recipe import RecipeConfig
from r1_mm.data import Sample
from r1_mm.models.forward.scoring import score_completions
from r1_mm.trainers.backend import (
    accumulation_cycle,
    backward_share,
    micro_batches,
    optimizer_step,
    packed_tokens,
    reference_model,
)
from r1_mm.trainers.base import BaseTrainer
from r1_mm.trainers.objects import RunObjects, with_objects
from r1_mm.trainers.preference_batch import PreferenceBatch
from r1_mm.trainers.preference_losses import PreferenceLossSettings, PreferenceNorm, preference_loss
from r1_mm.trainers.registry import register_trainer
from r1_mm.trainers.step_metrics import StepMetrics


class PreferenceDataError(ValueError):
    """A preference row without usable chosen/rejected responses (names the row and the field)."""


def response_ids(tokenizer: Any, text: Any, row_id: str, field: str) -> list[int]:
    """A response's token ids followed by end-of-sequence, as the policy would have ended it."""
    if not isinstance(text, str) or not text.strip():
        raise PreferenceDataError(f"row {row_id}: field '{field}' must be a non-empty string, got {text!r}")
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


class PreferenceTrainer(BaseTrainer):
    name = "dpo"

    def __init__(self, cfg: RecipeConfig | dict | str, *, model: Any = None, processor: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None, reward_funcs: Any = None):
        """``cfg``: a RecipeConfig, a dict of recipe sections or a recipe YAML path; the keywords take
        Python objects instead of the recipe's names (see ``r1_mm.trainers.objects``). Rows need
        ``chosen`` and ``rejected`` (TPO: built by ``r1-mm tpo``)."""
        objects = RunObjects(model, processor, train_dataset, eval_dataset, reward_funcs)
        cfg = with_objects(cfg, objects)
        torch.manual_seed(cfg.training.seed)
        a = cfg.algorithm
        super().__init__(cfg, need_reference=not a.dpo.precomputed_reference, objects=objects)
        cfg = self.cfg
        self.name = a.name
        self.settings = PreferenceLossSettings(loss_type=a.dpo.loss_type, beta=a.dpo.beta,
                                               label_smoothing=a.dpo.label_smoothing, nll_weight=a.dpo.nll_weight)
        self.tokenizer = self.processor.tokenizer

    def pairs(self, samples: list[Sample]) -> PreferenceBatch:
        """These rows' chosen and rejected responses, tokenized as the policy would have ended them."""
        return PreferenceBatch(
            samples=list(samples),
            chosen=[response_ids(self.tokenizer, s.row.get("chosen"), s.row_id, "chosen") for s in samples],
            rejected=[response_ids(self.tokenizer, s.row.get("rejected"), s.row_id, "rejected") for s in samples])

    def reference_logps(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(P,) each pair's chosen and rejected sequence logprob under the reference model (or the
        row's precomputed ``ref_chosen_logps`` / ``ref_rejected_logps``)."""
        device = self.learner.accelerator.device
        if self.cfg.algorithm.dpo.precomputed_reference:
            try:
                chosen = [float(s.row["ref_chosen_logps"]) for s in batch.samples]
                rejected = [float(s.row["ref_rejected_logps"]) for s in batch.samples]
            except (KeyError, TypeError, ValueError) as exc:
                raise PreferenceDataError(f"algorithm.dpo.precomputed_reference needs ref_chosen_logps and "
                                          f"ref_rejected_logps on every row ({exc})") from exc
            return torch.tensor(chosen, device=device), torch.tensor(rejected, device=device)
        with torch.no_grad(), reference_model(self.learner) as ref:
            logps, _, mask = self._score(ref, batch)
        seq = (logps * mask).sum(-1)
        rows = batch.rows.to(seq.device)
        return seq[rows.chosen], seq[rows.rejected]

    def _score(self, model: torch.nn.Module, batch: PreferenceBatch, entropy: bool = False):
        return score_completions(model, batch.samples, batch.completions, batch.responses_per_prompt, self.pad_id,
                                 temperature=1.0, mode=self.cfg.training.forward_mode, with_entropy=entropy)

    def next_pairs(self) -> PreferenceBatch:
        """The next batch of pairs from the dataset's rows."""
        return self.pairs(self.stream.next_batch(self.cfg.training.prompts_per_step))

    def train_step(self) -> dict[str, float]:
        return self.dpo_update(self.next_pairs())

    def dpo_update(self, batch: PreferenceBatch) -> dict[str, float]:
        """One optimizer step over these pairs, in the recipe's micro-batches (gradients accumulated)."""
        learner = self.learner
        acc = learner.accelerator
        norm = PreferenceNorm(pairs=float(len(batch)), chosen_tokens=float(batch.chosen_tokens))
        sums = StepMetrics()
        chosen_all, rejected_all = [], []
        learner.policy.train()
        split = micro_batches(self.cfg, [packed_tokens(s.num_prompt_tokens, [len(c), len(r)], self.cfg.training.forward_mode)
                                         for s, c, r in zip(batch.samples, batch.chosen, batch.rejected, strict=True)],
                              acc)
        with accumulation_cycle(learner, len(split)):
            for part in split:
                pairs = batch.select(part.start, part.stop)
                with acc.accumulate(learner.policy):
                    ref_chosen, ref_rejected = self.reference_logps(pairs)
                    logps, entropy, mask = self._score(learner.policy, pairs, entropy=True)
                    out = preference_loss(logps, mask, pairs.rows, ref_chosen, ref_rejected, self.settings, norm)
                    backward_share(learner, out.loss)
                sums.add_sum("train/loss", float(out.loss.detach()))
                if out.nll is not None:
                    sums.add_sum("train/nll", float(out.nll))
                sums.add_token_means(mask, **{"train/entropy": entropy})
                chosen_all.append(out.chosen_rewards)
                rejected_all.append(out.rejected_rewards)
        grad_norm = optimizer_step(learner, self.cfg.training.max_grad_norm)
        chosen, rejected = acc.gather(torch.cat(chosen_all)), acc.gather(torch.cat(rejected_all))
        metrics = {**sums.result(), **split.metrics()}
        metrics.update({
            "rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean()),
            "rewards/margins": float((chosen - rejected).mean()),
            "rewards/accuracies": float((chosen > rejected).float().mean()),
            "train/grad_norm": grad_norm if grad_norm is not None else float("nan"),
            "train/lr": float(learner.scheduler.get_last_lr()[0]),
        })
        return metrics

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['train/loss']:.3f}", "margin": f"{metrics['rewards/margins']:.3f}"}


@register_trainer("dpo")
def train_dpo(cfg: RecipeConfig) -> Path:
    return PreferenceTrainer(cfg).train()


@register_trainer("tpo")
def train_tpo(cfg: RecipeConfig) -> Path:
    return PreferenceTrainer(cfg).train()
