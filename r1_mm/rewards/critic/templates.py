"""Judge prompts and the parsers of their verdicts.

The judge sees the question's images (or the sampled frames of its video) followed by text, so
everything the policy saw. Verdicts end with a fixed line ("Score: N" / "Better: A|B|tie") that the
parsers read from the end, so a rationale may say anything before it.
"""

from __future__ import annotations

import re

POINTWISE = """Please act as an impartial judge. Given the {media} above and the question below, evaluate \
the quality of the AI assistant's response: correctness with respect to the visual content, helpfulness \
and clarity.{reference_block}

[Question]
{question}

[The Start of the Assistant's Response]
{response}
[The End of the Assistant's Response]

Explain your judgement in at most three sentences, then give the rating on its own line as \
"Score: N" where N is an integer from 1 (worst) to 10 (best)."""

PAIRWISE = """Please act as an impartial judge. Given the {media} above and the question below, compare \
the two responses of AI assistants: which one answers the question better, judged on correctness with \
respect to the visual content, helpfulness and clarity? The order of the responses must not \
influence you.{reference_block}

[Question]
{question}

[The Start of Response A]
{response_a}
[The End of Response A]

[The Start of Response B]
{response_b}
[The End of Response B]

Explain your judgement in at most three sentences, then give the verdict on its own line as \
"Better: A", "Better: B" or "Better: tie"."""

REFERENCE_BLOCK = "\n\nA reference answer is given; use it to check correctness: {reference}"

# regular expressions a server with structured outputs (vLLM) can constrain the judge to; the
# rationale is capped at 200 characters, so max_tokens >= 210 always reaches the verdict
POINTWISE_OUTPUT_REGEX = r"[^\n]{0,200}\nScore: (10|[1-9])"
PAIRWISE_OUTPUT_REGEX = r"[^\n]{0,200}\nBetter: (A|B|tie)"

_SCORE = re.compile(r"(?:score|rating)\s*[:=]?\s*\[*\s*(10|[1-9])(?:\.0)?\s*\]*(?:\s*/\s*10)?(?!\d)", re.IGNORECASE)
_BETTER = re.compile(r"better\s*[:=]\s*\[*\s*(a|b|tie)\b", re.IGNORECASE)


def media_phrase(num_images: int, num_frames: int) -> str:
    if num_frames:
        return f"{num_frames} frames sampled in order from a video"
    return "image" if num_images == 1 else f"{num_images} images" if num_images else "conversation"


def pointwise_prompt(question: str, response: str, *, media: str, reference: str | None = None) -> str:
    block = REFERENCE_BLOCK.format(reference=reference) if reference else ""
    return POINTWISE.format(media=media, question=question, response=response, reference_block=block)


def pairwise_prompt(question: str, response_a: str, response_b: str, *, media: str,
                    reference: str | None = None) -> str:
    block = REFERENCE_BLOCK.format(reference=reference) if reference else ""
    return PAIRWISE.format(media=media, question=question, response_a=response_a, response_b=response_b,
                           reference_block=block)


def parse_score(judgement: str | None) -> float | None:
    """The last "Score: N" (1-10) normalised to [0, 1] as (N - 1) / 9; None when there is none."""
    if not judgement:
        return None
    found = _SCORE.findall(judgement)
    return (int(found[-1]) - 1) / 9 if found else None


def parse_preference(judgement: str | None) -> str | None:
    """"A", "B" or "tie" from the last "Better: ..." line; None when there is none."""
    if not judgement:
        return None
    found = _BETTER.findall(judgement)
    if not found:
        return None
    choice = found[-1].lower()
    return "tie" if choice == "tie" else choice.upper()
