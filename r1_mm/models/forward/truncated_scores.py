"""Token logprobs under the distribution the rollout engines really sample from: top-k / top-p truncated.

Why: with ``rollout.top_p < 1`` or ``rollout.top_k`` every engine samples from the temperature-scaled
distribution renormalised over a kept set of tokens, and reports that distribution's logprob (vLLM's
``processed_logprobs``, the hf engine's own warpers). A learner scoring the untruncated softmax gets
log p(token) - log p(kept set) lower for every token: at identical weights the importance ratio was
0.70 at top_p=0.7 and 0.056 at top_k=5, and ``rollout_is`` multiplied every token's gradient by it.
So the learner scores the same truncated distribution (the convention is in docs/sampling.md):

- the kept set is chosen from the temperature-scaled logits without gradient, by vLLM's rule
  (``apply_top_k_top_p``; transformers' TopK / TopP warpers use the same one): top-k keeps every token
  whose scaled logit is >= the k-th largest (ties kept); top-p then sorts the remaining tokens
  ascending, accumulates their probabilities and drops those whose cumulative sum is <= 1 - p (the most
  likely token always stays). The kept set is stored as a per-position threshold on the scaled logit;
  the sampled token is always kept (a token at the boundary that the sampler kept and float rounding
  would drop here must not get log 0);
- the logprob is renormalised over the kept set, with gradient through every kept logit.

Memory: one chunk of positions at a time builds its (positions x vocabulary) float32 rows (64 MiB at
most, ``ROW_ELEMENTS``), in forward and again in backward; nothing of size (all tokens x vocabulary)
is kept. The head is gathered for backward under ZeRO-3, as TRL's tiled head does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROW_ELEMENTS = 1 << 24  # float32 (positions x vocabulary) values one chunk of positions may hold
# Columns of the vocabulary per projection tile: a (4,096 tokens x 4,096) float32 tile is 64 MiB.
VOCAB_TILE = 4096


@dataclass(frozen=True)
class Truncation:
    """The sampler's top-p / top-k (named as in vLLM's SamplingParams); inactive = the full softmax."""

    top_p: float = 1.0
    top_k: int | None = None

    @property
    def active(self) -> bool:
        return self.top_p < 1.0 or bool(self.top_k)


def kept_threshold(scaled: torch.Tensor, truncation: Truncation) -> torch.Tensor:
    """(R,) per row: the smallest temperature-scaled logit of the kept set, so that the kept set is
    ``scaled >= threshold`` (see the module docstring for the rule and its ties)."""
    rows, vocab = scaled.shape
    threshold = scaled.new_full((rows,), float("-inf"))
    masked = scaled
    if truncation.top_k and truncation.top_k < vocab:
        threshold = scaled.topk(truncation.top_k, dim=-1).values[:, -1]
        masked = scaled.masked_fill(scaled < threshold[:, None], float("-inf"))
    if truncation.top_p < 1.0:
        ascending = masked.sort(dim=-1).values
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        dropped = (cumulative <= 1.0 - truncation.top_p).sum(dim=-1).clamp(max=vocab - 1)  # a prefix: the sum only grows
        threshold = torch.maximum(threshold, ascending.gather(-1, dropped[:, None]).squeeze(-1))
    return threshold


@dataclass(frozen=True)
class HeadSpec:
    """How the LM head turns hidden states into scaled logits: ``softcap(scale * (h W^T + b)) / T``."""

    temperature: float = 1.0
    softcap: float | None = None
    logit_scale: float = 1.0


def _scaled_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: HeadSpec) -> torch.Tensor:
    """(R, V) float32 scaled logits of a chunk of positions; the matmuls run in the hidden states' dtype."""
    out = torch.empty(hidden.shape[0], weight.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, weight.shape[0], VOCAB_TILE):
        end = min(start + VOCAB_TILE, weight.shape[0])
        out[:, start:end] = hidden @ weight[start:end].to(hidden.dtype).t()
    if bias is not None:
        out += bias.float()
    out *= spec.logit_scale
    if spec.softcap is not None:
        out = spec.softcap * torch.tanh(out / spec.softcap)
    return out / spec.temperature


def _logit_grad(scaled: torch.Tensor, grad_scaled: torch.Tensor, spec: HeadSpec) -> torch.Tensor:
    """d loss / d (h W^T + b) from d loss / d scaled (chain rule through temperature, softcap, scale)."""
    grad = grad_scaled / spec.temperature
    if spec.softcap is not None:
        tanh = scaled * spec.temperature / spec.softcap
        grad = grad * (1.0 - tanh * tanh)
    return grad * spec.logit_scale


def _chunks(n: int, vocab: int) -> list[tuple[int, int]]:
    size = max(1, ROW_ELEMENTS // max(vocab, 1))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class TruncatedLogProbFunction(torch.autograd.Function):
    """Per position: log p_kept(target), optionally log p_full(target) and the entropy of the kept
    distribution, all three differentiable (the entropy as TRL's kernel's is)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                truncation: Truncation, spec: HeadSpec, with_full: bool, with_entropy: bool):
        n, vocab = hidden.shape[0], weight.shape[0]
        threshold = torch.empty(n, dtype=torch.float32, device=hidden.device)
        log_kept = torch.empty_like(threshold)
        log_full = torch.empty_like(threshold)
        target_scaled = torch.empty_like(threshold)
        entropy = torch.empty_like(threshold) if with_entropy else None
        with torch.no_grad():
            for lo, hi in _chunks(n, vocab):
                scaled = _scaled_rows(hidden[lo:hi], weight, bias, spec)
                target = scaled.gather(-1, targets[lo:hi, None]).squeeze(-1)
                cut = torch.minimum(kept_threshold(scaled, truncation), target)  # the sampled token stays kept
                kept = scaled.masked_fill(scaled < cut[:, None], float("-inf"))
                threshold[lo:hi], target_scaled[lo:hi] = cut, target
                log_kept[lo:hi] = kept.logsumexp(dim=-1)
                log_full[lo:hi] = scaled.logsumexp(dim=-1)
                if entropy is not None:
                    p = torch.exp(kept - log_kept[lo:hi, None])
                    entropy[lo:hi] = log_kept[lo:hi] - (p * torch.nan_to_num(kept, neginf=0.0)).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, threshold, log_kept, log_full,
                              log_kept if entropy is None else entropy)
        ctx.spec = spec
        return target_scaled - log_kept, (target_scaled - log_full) if with_full else None, entropy

    @staticmethod
    def backward(ctx, grad_kept: torch.Tensor | None, grad_full: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        from r1_mm.models.trl_imports import trl_module

        maybe_gather_lm_head_ctx = trl_module("trl.trainer.utils").maybe_gather_lm_head_ctx

        hidden, weight, bias, targets, threshold, log_kept, log_full, entropy = ctx.saved_tensors
        spec = ctx.spec
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        with maybe_gather_lm_head_ctx(weight, bias):
            vocab = weight.shape[0]
            grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
            for lo, hi in _chunks(hidden.shape[0], vocab):
                scaled = _scaled_rows(hidden[lo:hi], weight, bias, spec)
                h = hidden[lo:hi].float()
                onehot = torch.zeros_like(scaled).scatter_(-1, targets[lo:hi, None], 1.0)
                grad = torch.zeros_like(scaled)
                p_kept = torch.exp(scaled - log_kept[lo:hi, None]).masked_fill(scaled < threshold[lo:hi, None], 0.0)
                if grad_kept is not None:
                    grad += grad_kept[lo:hi, None].float() * (onehot - p_kept)
                if grad_entropy is not None:  # dH/dy_v = -p_v (log p_v + H) on the kept set
                    log_p = scaled - log_kept[lo:hi, None]
                    grad -= grad_entropy[lo:hi, None].float() * p_kept * (log_p + entropy[lo:hi, None])
                if grad_full is not None:
                    grad += grad_full[lo:hi, None].float() * (onehot - torch.exp(scaled - log_full[lo:hi, None]))
                grad = _logit_grad(scaled, grad, spec)
                for start in range(0, vocab, VOCAB_TILE):
                    end = min(start + VOCAB_TILE, vocab)
                    tile = grad[:, start:end]
                    if grad_hidden is not None:
                        grad_hidden[lo:hi] += tile @ weight[start:end].float()
                    if grad_weight is not None:
                        grad_weight[start:end] += tile.t() @ h
                if grad_bias is not None:
                    grad_bias += grad.sum(dim=0)
        return (grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
                grad_weight.to(weight.dtype) if grad_weight is not None else None,
                grad_bias.to(bias.dtype) if grad_bias is not None else None, None, None, None, None, None)
