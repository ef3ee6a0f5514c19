"""Rewards for free text: OCR transcriptions (word error rate) and open answers (ROUGE-L).

Both use maintained libraries (jiwer, Google's rouge-score) so numbers match what papers report.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from r1_mm.rewards.parsing import score_each
from r1_mm.rewards.registry import reward


def word_accuracy(prediction: str, reference: str) -> float:
    """1 - WER, clipped to [0, 1] (insertions can push WER above 1)."""
    import jiwer

    if not reference.split():
        return float(not prediction.split())
    if not prediction.split():
        return 0.0
    return max(0.0, 1.0 - jiwer.wer(reference, prediction))


@reward("ocr")
def ocr(completions: list[Any], solution: list[Any] | None = None, *, tag: str = "answer",
        require_tag: bool = True, lowercase: bool = False, **_: Any) -> list[float | None]:
    """1 - word error rate of the transcribed text against the solution."""

    def score(answer: str, sol: Any, _: int) -> float:
        sol = str(sol)
        return word_accuracy(answer.lower(), sol.lower()) if lowercase else word_accuracy(answer, sol)

    return score_each("ocr", completions, solution, score, tag=tag, require_tag=require_tag)


@lru_cache(maxsize=4)
def _rouge(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


@reward("free_form")
def free_form(completions: list[Any], solution: list[Any] | None = None, *, tag: str = "answer",
              require_tag: bool = True, use_stemmer: bool = True, **_: Any) -> list[float | None]:
    """ROUGE-L F1 of the answer against the solution (rouge-score's tokenizer keeps ASCII letters/digits)."""
    return score_each("free_form", completions, solution,
                      lambda a, s, _: float(_rouge(use_stemmer).score(str(s), a)["rougeL"].fmeasure), tag=tag,
                      require_tag=require_tag)
