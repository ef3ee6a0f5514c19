"""Rewards for free text: OCR transcriptions (word error rate) and open answers (ROUGE-L).

Both use maintained libraries (jiwer, Google's rouge-score) so numbers match what papers report.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from r1_mm.rewards.parsing import score_each
from r1_mm.rewards.registry import reward


def word_accuracy(prediction: str, reference: str) -> float:
    """1 - WER, clipped to [0, 1] (insertions can push WER above 1). Words are separated by any
    whitespace: jiwer's default splits on spaces only, so "stop\nhere" would be one word."""
    import jiwer

    prediction, reference = " ".join(prediction.split()), " ".join(reference.split())
    if not reference.split():
        return float(not prediction.split())
    if not prediction.split():
        return 0.0
    return max(0.0, 1.0 - jiwer.wer(reference, prediction))


@reward("ocr", needs=("solution",))
def ocr(completions: list[Any], solution: list[Any] | None = None, *, tag: str = "answer",
        require_tag: bool = True, lowercase: bool = False, **_: Any) -> list[float | None]:
    """1 - word error rate of the transcribed text against the solution."""

    def score(answer: str, sol: Any, _: int) -> float:
        sol = str(sol)
        return word_accuracy(answer.lower(), sol.lower()) if lowercase else word_accuracy(answer, sol)

    return score_each("ocr", completions, solution, score, tag=tag, require_tag=require_tag)


@lru_cache(maxsize=8)
def _rouge(use_stemmer: bool, rouge_types: tuple[str, ...]):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)


def mean_rouge_f1(prediction: str, reference: str, rouge_types: tuple[str, ...] = ("rougeL",),
                  use_stemmer: bool = True) -> float:
    """F1 averaged over ``rouge_types`` (Video-R1 averages rouge1, rouge2 and rougeL)."""
    scores = _rouge(use_stemmer, tuple(rouge_types)).score(reference, prediction)
    return sum(scores[t].fmeasure for t in rouge_types) / len(rouge_types)


@reward("free_form", needs=("solution",))
def free_form(completions: list[Any], solution: list[Any] | None = None, *, tag: str = "answer",
              require_tag: bool = True, use_stemmer: bool = True, rouge_types: list[str] | None = None,
              **_: Any) -> list[float | None]:
    """ROUGE F1 of the answer against the solution, averaged over ``rouge_types`` (default rougeL;
    rouge-score's tokenizer keeps ASCII letters/digits)."""
    types = tuple(rouge_types or ("rougeL",))
    return score_each("free_form", completions, solution,
                      lambda a, s, _: float(mean_rouge_f1(a, str(s), types, use_stemmer)), tag=tag,
                      require_tag=require_tag)
