"""A CPU stand-in for the flash-attn package's kernels, for tests only.

Why a mock: flash-attention kernels need a CUDA device, which this machine does not have. Everything
above the kernel is real: transformers' flash-attention integration (its lazy import, kwargs
processing, dtype handling, varlen dispatch) and r1-mm's packed attention. The stand-in follows
flash_attn_varlen_func's documented semantics, written independently of r1-mm's kernels in plain
matmul + softmax: sequences given by cumulative lengths, and with ``causal=True`` a query shorter than
its keys aligned to the bottom-right (flash-attn >= 2.1), and ``window_size=(left, right)`` keys from
query - left to query + right in those aligned positions (-1: unlimited).
"""

from __future__ import annotations

import sys
import types
from collections import Counter

import torch

CALLS: Counter[str] = Counter()


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    CALLS["varlen"] += 1
    assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(bq) - 1):
        qs = q[bq[s]:bq[s + 1]].float()  # (lq, H, D)
        ks = k[bk[s]:bk[s + 1]].float().repeat_interleave(groups, dim=1)
        vs = v[bk[s]:bk[s + 1]].float().repeat_interleave(groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        lq, lk = qs.shape[0], ks.shape[0]
        key, query = torch.arange(lk)[None, :], torch.arange(lq)[:, None] + (lk - lq)  # bottom-right aligned
        allowed = torch.ones((lq, lk), dtype=torch.bool)
        if causal:
            allowed &= key <= query
        left, right = window_size  # -1 = unlimited; otherwise keys in [query - left, query + right]
        if left >= 0:
            allowed &= key >= query - left
        if right >= 0:
            allowed &= key <= query + right
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[bq[s]:bq[s + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs).to(q.dtype)
    return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    """Batched equal-length form: each row is one sequence."""
    CALLS["dense"] += 1
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    cu_q = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32)
    cu_k = torch.arange(0, (b + 1) * lk, lk, dtype=torch.int32)
    out = flash_attn_varlen_func(q.reshape(b * lq, *q.shape[2:]), k.reshape(b * lk, *k.shape[2:]),
                                 v.reshape(b * lk, *v.shape[2:]), cu_q, cu_k, lq, lk, dropout_p, softmax_scale, causal)
    return out.reshape(q.shape)


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("the CPU stand-in has no paged kv-cache kernel")


def install(monkeypatch) -> Counter[str]:
    """Make transformers load this module as flash-attn 2 (its availability check asks for CUDA)."""
    import transformers.modeling_flash_attention_utils as fa_utils

    package = types.ModuleType("flash_attn")
    package.flash_attn_varlen_func = flash_attn_varlen_func
    package.flash_attn_func = flash_attn_func
    package.flash_attn_with_kvcache = flash_attn_with_kvcache
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = fa_utils._pad_input, fa_utils._unpad_input
    package.bert_padding = padding
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", padding)
    monkeypatch.setattr(fa_utils, "is_flash_attn_2_available", lambda: True)
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)
    CALLS.clear()
    return CALLS
