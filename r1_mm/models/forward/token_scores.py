"""Per-token logprobs and entropy of chosen positions, without ever building (tokens x vocabulary) logits.

Why: at Qwen2.5-VL's vocabulary (151,936) a GRPO step with G=8 x 512-token completions scores 4,096
tokens; full float32 logits, their log-softmax and the softmax for the entropy are ~2.5 GB each, and
they dominated the learner's memory (1.9x TRL's). TRL's chunked LM-head kernel
(``trl.kernels.ChunkedLogProbFunction``) projects the hidden states through the head in tiles, folds
each tile into running log-sum-exp statistics, and recomputes the tiles in backward; it gathers a
ZeRO-3-partitioned head for both passes. r1-mm uses it as is and adds what it does not know:

- the media placeholder tokens the rollout engines never sample are masked by a constant additive
  bias (-1e4: exp underflows to exactly 0 in float32 and bfloat16, where -inf would make the
  entropy's p * z term NaN), so the learner's distribution is the sampler's;
- any set of positions, repeats allowed: the prompt's last position scores the first token of each
  of its G completions;
- top-k / top-p truncation (the distribution the engines sample from): then the head runs through
  ``truncated_scores`` instead, which also returns the untruncated logprobs the KL term uses;
- distillation: a teacher's forward returns its last hidden states at the scored positions
  (``hidden_only``), and the student's then returns the per-token divergence to the teacher's
  next-token distribution (``divergence``): TRL's ``ChunkedDivergenceFunction`` projects both models'
  hidden states through their heads in tiles, so neither (tokens x vocabulary) logits exist, and
  gathers ZeRO-3-partitioned heads in forward and backward.

The head runs inside the model's own forward (an instance-level forward wrapper, installed once at
load time), because under DeepSpeed ZeRO-3 gradient reduction of the head relies on the engine's
forward hooks, and under DDP on its forward. Calls without a score request (generation, the
library's forward) are the original forward, untouched.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

from r1_mm.models.forward.truncated_scores import VOCAB_TILE, HeadSpec, TruncatedLogProbFunction, Truncation
from r1_mm.models.fsdp import fsdp_gathered

SUPPRESS_LOGIT = -1.0e4


@dataclass(frozen=True)
class DivergenceTarget:
    """The teacher's side of a per-token divergence: its hidden states at the request's positions (from its own
    forward with ``hidden_only``) and its LM head; ``beta`` as TRL's GKD: 0 forward KL(teacher || student), 1
    reverse KL(student || teacher), in between the generalised JSD with mixture (1 - beta) p_s + beta p_t."""

    hidden: torch.Tensor  # (N, H_teacher), no gradient
    head: torch.nn.Module  # the teacher's LM head: at least the student's vocabulary rows (extra rows unused)
    config: Any  # the teacher's text config (final_logit_softcapping, logit_scale)
    beta: float


@dataclass(frozen=True)
class ScoreRequest:
    """Which positions score which targets, under what distribution."""

    positions: torch.Tensor  # (N,) flat indices into (batch x sequence) of the model's input
    targets: torch.Tensor  # (N,) the token each position's next-token distribution scores
    temperature: float = 1.0
    suppressed_ids: tuple[int, ...] = ()
    with_entropy: bool = False
    truncation: Truncation = Truncation()  # the sampler's top-p / top-k: logps renormalised over its kept set
    with_full_logps: bool = False  # also the untruncated logprobs (the KL-to-reference convention)
    hidden_only: bool = False  # return the last hidden states at ``positions`` instead (a teacher's side)
    divergence: DivergenceTarget | None = None  # return the per-token divergence to a teacher instead


@dataclass
class TokenScores(ModelOutput):
    """A ModelOutput (a dict) so that DeepSpeed ZeRO-3 finds the tensors in it: its backward hooks,
    which re-gather partitioned parameters, attach only to outputs it can traverse."""

    logps: torch.Tensor | None = None  # (N,) float32
    entropy: torch.Tensor | None = None  # (N,) float32, when requested (of the truncated distribution)
    full_logps: torch.Tensor | None = None  # (N,) untruncated logprobs, when requested
    hidden: torch.Tensor | None = None  # (N, H) last hidden states, with ``hidden_only``
    divergence: torch.Tensor | None = None  # (N,) float32 divergence to the teacher, with ``divergence``


class TokenScoringError(RuntimeError):
    """The model cannot be scored this way (the message says why and what to do)."""


def _suppression_bias(lm_head: torch.nn.Module, vocab: int, suppressed: tuple[int, ...]) -> torch.Tensor | None:
    weight = lm_head.weight
    bias = getattr(lm_head, "bias", None)
    if not suppressed:
        return bias
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    zero3 = is_deepspeed_zero3_enabled()
    mask = torch.zeros(vocab, dtype=torch.float32, device=weight.device)
    mask[list(suppressed)] = SUPPRESS_LOGIT
    if bias is None:
        if zero3:  # TRL's backward gathers every tensor it was given as the head's; this one is no ZeRO parameter
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            mask.ds_status = ZeroParamStatus.AVAILABLE
        return mask
    if zero3:
        raise TokenScoringError("an LM head with a bias cannot be combined with suppressed media tokens under ZeRO-3 "
                                "(its gradient would bypass the partition); use ZeRO-2 or DDP for this model")
    return bias + mask.to(bias.dtype)


def _scoring_forward(self: Any, *args: Any, r1mm_score: ScoreRequest | None = None, **kwargs: Any) -> Any:
    if r1mm_score is None:
        return self._r1mm_original_forward(*args, **kwargs)
    from r1_mm.models.trl_imports import trl_module

    ChunkedLogProbFunction = trl_module("trl.kernels").ChunkedLogProbFunction
    maybe_gather_lm_head_ctx = trl_module("trl.trainer.utils").maybe_gather_lm_head_ctx

    kwargs["use_cache"] = False
    kwargs.pop("logits_to_keep", None)
    hidden = self.base_model(*args, **kwargs).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, r1mm_score.positions)
    if r1mm_score.hidden_only:
        return TokenScores(hidden=hidden)
    lm_head = self.get_output_embeddings()
    text = self.config.get_text_config()
    if r1mm_score.divergence is not None:
        return _divergence(hidden, lm_head, text, r1mm_score)
    outputs = ("log_probs", "entropy") if r1mm_score.with_entropy else ("log_probs",)
    with maybe_gather_lm_head_ctx(lm_head.weight, getattr(lm_head, "bias", None)), \
            fsdp_gathered(self, lm_head.weight, getattr(lm_head, "bias", None)):
        vocab = lm_head.weight.shape[0]
        if r1mm_score.suppressed_ids and max(r1mm_score.suppressed_ids) >= vocab:
            raise TokenScoringError(f"suppressed token ids {r1mm_score.suppressed_ids} exceed the head's vocabulary {vocab}")
        bias = _suppression_bias(lm_head, vocab, r1mm_score.suppressed_ids)
        softcap, scale = getattr(text, "final_logit_softcapping", None), float(getattr(text, "logit_scale", None) or 1.0)
        if r1mm_score.truncation.active:
            spec = HeadSpec(float(r1mm_score.temperature), softcap, scale)
            logps, full, entropy = TruncatedLogProbFunction.apply(
                hidden, lm_head.weight, bias, r1mm_score.targets, r1mm_score.truncation, spec,
                r1mm_score.with_full_logps, r1mm_score.with_entropy)
        else:
            logps, entropy, *_ = ChunkedLogProbFunction.apply(
                hidden, lm_head.weight, bias, r1mm_score.targets, float(r1mm_score.temperature), VOCAB_TILE,
                softcap, scale, outputs)
            full = logps if r1mm_score.with_full_logps else None
    return TokenScores(logps=logps.float(), entropy=None if entropy is None else entropy.float(),
                       full_logps=None if full is None else full.float())


def _head_spec(text: Any) -> tuple[float | None, float]:
    return getattr(text, "final_logit_softcapping", None), float(getattr(text, "logit_scale", None) or 1.0)


def _divergence(hidden: torch.Tensor, lm_head: torch.nn.Module, text: Any, request: ScoreRequest) -> TokenScores:
    """Per-token divergence to the teacher and the student's entropy, both under the request's temperature
    and suppressed tokens (masked in both models' distributions: neither engine samples them)."""
    from r1_mm.models.trl_imports import trl_module

    ChunkedDivergenceFunction = trl_module("trl.kernels.chunked_divergence").ChunkedDivergenceFunction
    maybe_gather_lm_head_ctx = trl_module("trl.trainer.utils").maybe_gather_lm_head_ctx
    target = request.divergence
    teacher_head = target.head
    with (maybe_gather_lm_head_ctx(lm_head.weight, getattr(lm_head, "bias", None)),
          maybe_gather_lm_head_ctx(teacher_head.weight, getattr(teacher_head, "bias", None))):
        vocab, teacher_vocab = lm_head.weight.shape[0], teacher_head.weight.shape[0]
        if teacher_vocab < vocab:
            raise TokenScoringError(f"the teacher's head has {teacher_vocab} rows, fewer than the student's {vocab}")
        if request.suppressed_ids and max(request.suppressed_ids) >= vocab:
            raise TokenScoringError(f"suppressed token ids {request.suppressed_ids} exceed the head's vocabulary {vocab}")
        bias = _suppression_bias(lm_head, vocab, request.suppressed_ids)
        teacher_bias = _suppression_bias(teacher_head, teacher_vocab, request.suppressed_ids)
    softcap, scale = _head_spec(text)
    teacher_softcap, teacher_scale = _head_spec(target.config)
    divergence, entropy = ChunkedDivergenceFunction.apply(
        hidden, lm_head.weight, bias, target.hidden.to(hidden.device), teacher_head.weight, teacher_bias,
        float(target.beta), float(request.temperature), scale, softcap, teacher_scale, teacher_softcap)
    return TokenScores(divergence=divergence.float(), entropy=entropy.float())


def install(model: torch.nn.Module) -> torch.nn.Module:
    """Give a transformers model the scoring forward (idempotent); returns the model."""
    if getattr(model, "_r1mm_original_forward", None) is None:
        if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
            raise TokenScoringError(f"{type(model).__name__} has no LM head to score tokens with")
        model._r1mm_original_forward = model.forward

        # the original signature stays visible: generate() picks the model kwargs it prepares (M-RoPE
        # position ids among them) by inspecting it
        @functools.wraps(type(model).forward)
        def forward(self: Any, *args: Any, r1mm_score: ScoreRequest | None = None, **kwargs: Any) -> Any:
            return _scoring_forward(self, *args, r1mm_score=r1mm_score, **kwargs)

        model.forward = types.MethodType(forward, model)
    return model


def is_installed(model: torch.nn.Module) -> bool:
    return getattr(model, "_r1mm_original_forward", None) is not None


def score(model: torch.nn.Module, model_kwargs: dict[str, Any], request: ScoreRequest) -> TokenScores:
    """Run ``model`` (wrapped or not: DDP, DeepSpeed, PEFT pass the request through) and score."""
    from r1_mm.models.weights import unwrap

    install(unwrap(model))
    out = model(**model_kwargs, r1mm_score=request)
    if not isinstance(out, TokenScores):
        raise TokenScoringError(f"{type(unwrap(model)).__name__}'s forward did not return token scores; was the model's "
                                "forward replaced after loading?")
    return out
