"""On-policy distillation (``algorithm: distill``): the student samples, a frozen teacher scores every token it wrote.

Why on-policy: the student learns on the states it visits itself (its own prefixes), which supervised
distillation on the teacher's outputs never shows it (Agarwal et al. 2024, GKD; Thinking Machines' "On-Policy
Distillation", 2025). Each step: ``rollout.num_generations`` completions per prompt from the current student
(any rollout engine), then one optimizer step on the token-mean divergence of the student's next-token
distribution to the teacher's at every completion position (``algorithm.distill.loss``: the reverse KL, or the
generalised JSD of TRL's GKD with ``beta``; ``r1_mm.trainers.distill_losses`` writes them out).

Both models see the same inputs: the prompt's ids and media as the student's processor made them (checked at
load to be exactly what the teacher's processor makes of the first row), packed by the grouped forward (each
prompt and its media run once for its G completions, in each model). The teacher's forward returns its last
hidden states at the scored positions; the student's forward projects both through their heads in tiles (TRL's
``ChunkedDivergenceFunction``): no (tokens x vocabulary) logits exist. Teacher and student may differ in size
but must share the tokenizer (the same vocabulary and ids; the teacher's head may have more rows, e.g.
Qwen2.5-VL-7B's 152,064 against 3B's 151,936: the rows past the student's are never read).

The teacher is local (``algorithm.distill.teacher_engine: local``, above) or served by vLLM (``vllm``:
``r1-mm serve rollout`` servers, given by ``teacher_servers`` or one the run starts from ``teacher``;
``served_teacher.py``). A served teacher returns only the logprob of each token the student sampled (its
``/score``: vLLM's prompt logprobs, the raw model at temperature 1), so the loss is the sampled-token estimate of the
reverse KL (``distill_losses.sampled_reverse_kl``: advantage -(log p_s - log p_t) per token, detached, times
log p_s, token mean), with the student's logprobs taken under its sampling distribution (rollout.temperature, the
suppressed media tokens, top-p / top-k), whose samples these are; ``train/reverse_kl_estimate`` is the token mean of
log p_s - log p_t. Refused at load: a served teacher with ``loss: jsd`` (it needs full distributions), with
``algorithm.distill.temperature`` other than 1, and a server whose tokenizer is not the student's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from r1_mm.config.recipe import ConfigError, RecipeConfig, teacher_model_config
from r1_mm.core.seeds import derive_seed
from r1_mm.data import Sample
from r1_mm.data.prompts import PromptBuilder
from r1_mm.models.forward.scoring import score_completions, score_divergence
from r1_mm.models.forward.truncated_scores import Truncation
from r1_mm.models.loading import load_model, load_processor, prepare_processor
from r1_mm.rollout.base import Completion, RolloutEngine, SamplingSettings, media_token_ids
from r1_mm.rollout.engines import make_engine
from r1_mm.trainers.backend import (
    accumulation_cycle,
    backward_share,
    check_unverified_family,
    generate_groups,
    micro_batches,
    optimizer_step,
    packed_tokens,
)
from r1_mm.trainers.base import BaseTrainer
from r1_mm.trainers.distill_losses import divergence_beta, sampled_reverse_kl
from r1_mm.trainers.objects import RunObjects, with_objects
from r1_mm.trainers.registry import register_trainer
from r1_mm.trainers.rollout_correction import sampling_logprobs
from r1_mm.trainers.step_metrics import StepMetrics


def tokenizer_mismatch(student: Any, teacher: Any) -> str | None:
    """Why the two tokenizers would not give one token the same id (None: they agree)."""
    s, t = getattr(student, "tokenizer", student), getattr(teacher, "tokenizer", teacher)
    sv, tv = s.get_vocab(), t.get_vocab()
    if sv != tv:
        only_s, only_t = sorted(set(sv) - set(tv))[:3], sorted(set(tv) - set(sv))[:3]
        moved = sorted(k for k in set(sv) & set(tv) if sv[k] != tv[k])[:3]
        return (f"{len(sv)} vs {len(tv)} tokens; only the student's: {only_s}, only the teacher's: {only_t}, "
                f"different ids: {moved}")
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(s, name, None) != getattr(t, name, None):
            return f"{name} {getattr(s, name, None)} vs {getattr(t, name, None)}"
    return None


def prompt_mismatch(student: Sample, teacher: Sample) -> str | None:
    """Why the teacher's processor would give the first row other inputs than the student's (None: equal)."""
    a, b = student.inputs, teacher.inputs
    if sorted(a) != sorted(b):
        return f"inputs {sorted(a)} vs {sorted(b)}"
    for key in a:
        x, y = a[key], b[key]
        if hasattr(x, "shape") and hasattr(y, "shape"):
            if tuple(x.shape) != tuple(y.shape) or not torch.equal(torch.as_tensor(x), torch.as_tensor(y)):
                return f"{key} differs ({tuple(x.shape)} vs {tuple(y.shape)})"
        elif x != y:
            return f"{key} differs"
    return None


def head_rows(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings()
    weight = head.weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])  # ZeRO-3 partitions keep the full shape in ds_shape


class DistillTrainer(BaseTrainer):
    name = "distill"

    def __init__(self, cfg: RecipeConfig | dict | str, *, model: Any = None, processor: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None):
        """``cfg``: a RecipeConfig, a dict of recipe sections or a recipe YAML path; ``model`` / ``processor`` /
        ``train_dataset``: Python objects instead of the recipe's names (the student's; the teacher is always
        ``algorithm.distill.teacher``, loaded by name)."""
        objects = RunObjects(model, processor, train_dataset, eval_dataset, None)
        cfg = with_objects(cfg, objects)
        torch.manual_seed(cfg.training.seed)
        super().__init__(cfg, need_reference=False, objects=objects)
        cfg = self.cfg
        self.served = None
        self.teacher = None
        try:
            if cfg.algorithm.distill.teacher_engine == "vllm":
                from r1_mm.trainers.served_teacher import ServedTeacher

                self.served = ServedTeacher(cfg, self.processor)
            else:
                self.teacher = self._load_teacher()
            self.engine: RolloutEngine = make_engine(cfg.rollout.engine, model=self.learner.unwrapped,
                                                     processor=self.processor, cfg=cfg)
        except BaseException:
            if self.served is not None:
                self.served.close()
            self.run.close()
            raise
        if model is not None and not getattr(self.engine, "samples_from_policy", False):
            self.engine.update_weights(self.learner.unwrapped)
        self.suppressed_ids = media_token_ids(self.learner.unwrapped.config)
        d = cfg.algorithm.distill
        self.beta = divergence_beta(d.loss, d.beta)

    # -- the teacher --------------------------------------------------------------------------------
    def _load_teacher(self) -> torch.nn.Module:
        """The teacher, after the checks that need no weights: its tokenizer and its processor's prompt ids are
        the student's (each refused in one line); then its head covers the student's vocabulary."""
        cfg = self.cfg
        tcfg = teacher_model_config(cfg)
        teacher_processor = prepare_processor(load_processor(tcfg))
        if why := tokenizer_mismatch(self.processor, teacher_processor):
            raise ConfigError(f"algorithm.distill.teacher {tcfg.name_or_path}: its tokenizer is not the student's ({why}); "
                              "distillation compares the two distributions token id by token id")
        if self.stream.rows:
            builder = self.stream.builder
            teacher_builder = PromptBuilder(teacher_processor, cfg.data, cfg.media, builder.media_root, tools=builder.tools)
            row = self.stream.rows[0]
            if why := prompt_mismatch(builder.prepare(row, 0), teacher_builder.prepare(row, 0)):
                raise ConfigError(f"algorithm.distill.teacher {tcfg.name_or_path}: its processor prepares the first row "
                                  f"differently from the student's ({why}); both models must see the same prompt ids "
                                  "and media")
        grouped = cfg.training.forward_mode == "grouped"
        teacher = load_model(tcfg, trainable=False, grouped=grouped)
        check_unverified_family(teacher, teacher_processor, grouped=grouped)
        rows, student_rows = head_rows(teacher), head_rows(self.learner.unwrapped)
        used = len(self.processor.tokenizer)
        if rows < student_rows or student_rows < used:
            raise ConfigError(f"algorithm.distill.teacher {tcfg.name_or_path}: its LM head has {rows} rows and the "
                              f"student's {student_rows}, for a tokenizer of {used}; the teacher's must cover the "
                              "student's, which must cover the tokenizer")
        acc = self.learner.accelerator
        if self.learner.is_deepspeed:
            from r1_mm.models.trl_imports import trl_module

            return trl_module("trl.models.utils").prepare_deepspeed(teacher, acc)
        return teacher.to(acc.device)

    # -- the step -------------------------------------------------------------------------------------
    def _sampling(self) -> SamplingSettings:
        seed = derive_seed(self.cfg.training.seed, "distill.rollout", self.step, self.learner.accelerator.process_index)
        return SamplingSettings.from_config(self.cfg.rollout, seed=seed)

    def train_step(self) -> dict[str, float]:
        t0 = time.time()
        samples = self.stream.next_batch(self.cfg.training.prompts_per_step)
        groups = generate_groups(self.learner, self.engine, samples, self.cfg.rollout.num_generations, self._sampling())
        t_rollout = time.time() - t0
        metrics = self.distill_update(samples, groups)
        tokens = sum(len(c.token_ids) for group in groups for c in group)
        metrics.update({"time/rollout_s": t_rollout, "time/step_s": time.time() - t0,
                        "completions/mean_length": tokens / max(1, sum(len(g) for g in groups))})
        return metrics

    def distill_update(self, samples: list[Sample], groups: list[list[Completion]]) -> dict[str, float]:
        """One optimizer step on the token-mean divergence over every completion token of the step (the same mean
        whatever the micro-batches), accumulated over the recipe's micro-batches."""
        cfg, learner = self.cfg, self.learner
        acc = learner.accelerator
        g = cfg.rollout.num_generations
        if any(len(group) != g for group in groups):
            raise RuntimeError(f"the engine returned groups of {sorted({len(x) for x in groups})} completions, not {g}")
        local = torch.tensor([float(sum(len(c.token_ids) for group in groups for c in group))], device=acc.device)
        total = float(acc.gather(local).sum()) / acc.num_processes  # mean tokens per process: shares sum to the mean
        split = micro_batches(cfg, [packed_tokens(s.num_prompt_tokens, [len(c.token_ids) for c in group],
                                                  cfg.training.forward_mode)
                                    for s, group in zip(samples, groups, strict=True)], acc)
        d = cfg.algorithm.distill
        teacher_logps = None
        if self.served is not None:  # one request per server for the whole step
            teacher_logps = self.served.score(samples, [[list(c.token_ids) for c in group] for group in groups])
        sums = StepMetrics()
        learner.policy.train()
        with accumulation_cycle(learner, len(split)):
            for part in split:
                rows = list(part)
                with acc.accumulate(learner.policy):
                    if teacher_logps is None:
                        divergence, entropy, mask = score_divergence(
                            learner.policy, self.teacher, [samples[i] for i in rows],
                            [c.token_ids for i in rows for c in groups[i]], g, self.pad_id, beta=self.beta,
                            temperature=d.temperature, mode=cfg.training.forward_mode,
                            suppressed_ids=self.suppressed_ids)
                        extra = {}
                    else:
                        divergence, entropy, mask, estimate = self._sampled_loss(
                            [samples[i] for i in rows], [c.token_ids for i in rows for c in groups[i]],
                            [lp for i in rows for lp in teacher_logps[i]])
                        extra = {"train/reverse_kl_estimate": estimate}
                    mask = mask.to(divergence.dtype)
                    loss_sum = (divergence * mask).sum()
                    backward_share(learner, loss_sum / max(total, 1.0))
                sums.add_sum("train/loss", float(loss_sum.detach()) / max(total, 1.0))
                sums.add_token_means(mask, **{"train/entropy": entropy}, **extra)
        grad_norm = optimizer_step(learner, cfg.training.max_grad_norm)
        self.engine.update_weights(learner.unwrapped)  # the next step samples from these weights (on-policy)
        metrics = sums.result()
        metrics.update(split.metrics())
        if self.served is None:  # a served teacher's loss is a surrogate: its divergence is reverse_kl_estimate
            metrics[f"train/{d.loss}"] = metrics["train/loss"]
        metrics.update({
            "train/tokens": float(local.item()),
            "train/grad_norm": grad_norm if grad_norm is not None else float("nan"),
            "train/lr": float(learner.scheduler.get_last_lr()[0]),
        })
        return metrics

    def _sampled_loss(self, samples: list[Sample], completions: list[list[int]],
                      teacher_logps: list[list[float]]) -> tuple[torch.Tensor, ...]:
        """A served teacher's loss per token (``sampled_reverse_kl``), the student's entropy, the scored mask and
        the per-token estimate of the reverse KL; the student's logprobs under its sampling distribution (as GRPO
        scores them: the temperature, the suppressed media tokens, the sampler's top-p / top-k)."""
        r = self.cfg.rollout
        logps, entropy, mask = score_completions(
            self.learner.policy, samples, completions, self.cfg.rollout.num_generations, self.pad_id,
            temperature=max(r.temperature, 1e-6), mode=self.cfg.training.forward_mode, with_entropy=True,
            suppressed_ids=self.suppressed_ids, truncation=Truncation(r.top_p, r.top_k))
        teacher = sampling_logprobs(teacher_logps, logps.shape[1], logps.device)  # (N, C), zero-padded
        loss, estimate = sampled_reverse_kl(logps, teacher)
        return loss, entropy, mask, estimate

    def run_info_extra(self) -> dict[str, Any]:
        if self.served is not None:
            return {"teacher": "served", "teacher_name_or_path": self.cfg.algorithm.distill.teacher or None,
                    **self.served.info(), "distill_loss": "sampled_reverse_kl"}
        from r1_mm.models.weights import unwrap

        teacher = unwrap(self.teacher)
        return {"teacher": type(self.teacher).__name__, "teacher_name_or_path": self.cfg.algorithm.distill.teacher,
                "teacher_dtype": str(next(teacher.parameters()).dtype).replace("torch.", ""),
                "teacher_head_rows": head_rows(teacher), "distill_loss": self.cfg.algorithm.distill.loss,
                "distill_beta": self.beta}

    def after_resume(self, state: dict) -> None:
        if not getattr(self.engine, "samples_from_policy", False):
            self.engine.update_weights(self.learner.unwrapped)  # the engine still holds the starting weights

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        if "train/reverse_kl_estimate" in metrics:
            return {"kl_est": f"{metrics['train/reverse_kl_estimate']:.4f}"}
        return {"loss": f"{metrics['train/loss']:.4f}"}

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        served = getattr(self, "served", None)
        if served is not None:
            served.close()


@register_trainer("distill")
def train_distill(cfg: RecipeConfig) -> Path:
    return DistillTrainer(cfg).train()
