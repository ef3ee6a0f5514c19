"""One optimizer step's metrics, combined over its micro-batches.

Why a helper: with gradient accumulation a step's loss is the sum of its micro-batches' shares, its
per-token statistics (entropy, KL, clip ratios, sampler mismatch) are token-weighted means over all
micro-batches, and maxima are maxima; logged values must not depend on how the step was split.
"""

from __future__ import annotations

import torch


class StepMetrics:
    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weighted: dict[str, float] = {}
        self._weights: dict[str, float] = {}
        self._maxima: dict[str, float] = {}
        self._fixed: dict[str, float] = {}

    def add_sum(self, name: str, value: float) -> None:
        """A micro-batch's share of a step total (its loss share)."""
        self._sums[name] = self._sums.get(name, 0.0) + value

    def add_means(self, stats: dict[str, float], weight: float) -> None:
        """Means over a micro-batch's ``weight`` tokens; names ending in ``_max`` are maxima."""
        for name, value in stats.items():
            if name.endswith("_max"):
                self._maxima[name] = max(self._maxima.get(name, float("-inf")), value)
            else:
                self._weighted[name] = self._weighted.get(name, 0.0) + value * weight
                self._weights[name] = self._weights.get(name, 0.0) + weight

    def add_token_means(self, mask: torch.Tensor, **per_token: torch.Tensor | None) -> None:
        """Per-token tensors (rows x tokens) averaged over the tokens where ``mask`` is set."""
        m = mask.detach().float()
        tokens = float(m.sum())
        for name, values in per_token.items():
            if values is None:
                continue
            self._weighted[name] = self._weighted.get(name, 0.0) + float((values.detach().float() * m).sum())
            self._weights[name] = self._weights.get(name, 0.0) + tokens

    def set(self, name: str, value: float) -> None:
        self._fixed[name] = value

    def result(self) -> dict[str, float]:
        out = dict(self._sums)
        out.update({n: v / max(self._weights[n], 1.0) for n, v in self._weighted.items()})
        out.update(self._maxima)
        out.update(self._fixed)
        return out
