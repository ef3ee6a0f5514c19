"""Reward cost: every built-in verifiable and shaping reward timed on synthetic completions.

The completions (1,000 by default, fixed seed) mix what a policy writes: short answers (numbers,
letters, yes/no, intervals), LaTeX, prose with numbers in it, and hostile strings (100k-character
repetitions, thousands of unclosed tags or braces, 5,000-digit numbers, LaTeX bombs that sympy
cannot finish). A policy repeats itself, so some completions occur more than once.

For each reward: one call per completion (calls/s, median and max per call), then the same
completions in batches of --batch (median and max time of one batch's call). ``accuracy`` runs
three ways: cold (fresh math-verify worker, empty caches: the per-call figures); again on the same
completions (verdicts cached); and in batches through the reward runner with a fresh worker under
``rewards.batch_timeout_s=--budget``, next to what the same batches cost without a budget (the sum
of their completions' cold per-call times). ``critic`` needs a judge server and is not timed here.
Usage:

    .venv/bin/python bench/rewards.py                       # 1,000 completions, batches of 64, budget 10 s
    .venv/bin/python bench/rewards.py --n 200 --budget 5
    .venv/bin/python bench/rewards.py --bombs-only          # one batch of 8 LaTeX bombs, with and without budget
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

REWARDS = ("accuracy", "numeric", "mra", "relative_accuracy", "mcq", "yes_no", "temporal_iou", "bbox_iou", "ocr",
           "free_form", "format", "overlong", "repetition")
OPTIONS = ["A. a cat", "B. a dog", "C. two birds", "D. a fish"]
WORDS = ("the", "a", "red", "cube", "man", "walks", "towards", "door", "count", "there", "are", "so", "total",
         "left", "of", "table", "first", "then", "each", "basket", "holds", "apples", "video", "frame", "moves")


def short_answer(rng: random.Random, gold: int) -> str:
    return rng.choice([str(gold), str(gold + rng.choice((-1, 1))), f"{gold}.0", "B", "(C)", "yes", "no", "a dog",
                       "[1.5, 3.0]", "[0, 0, 10, 10]", "the quick brown fox"])


def latex_answer(rng: random.Random, gold: int) -> str:
    k = rng.randint(2, 9)
    return rng.choice([f"\\frac{{{gold * k}}}{{{k}}}", f"\\sqrt{{{gold * gold}}}", f"{gold}^{{{k}}}", f"\\boxed{{{gold}}}",
                       f"{k}x + {gold}", f"\\dfrac{{{gold}}}{{{k}}}\\pi", f"{gold}\\%", f"x = {gold}",
                       f"\\left( {gold}, {k} \\right)", f"{gold} \\times 10^{{{k}}}"])


def prose_answer(rng: random.Random, gold: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(10, 60))]
    for _ in range(rng.randint(1, 3)):
        words.insert(rng.randrange(len(words)), str(rng.choice((gold, rng.randint(1, 99)))))
    return " ".join(words).capitalize() + "."


def hostile_answer(rng: random.Random, gold: int) -> str:
    return rng.choice([
        "ha " * 33_000, "<answer>" * 20_000 + str(gold), "9" * 5_000, "{" * 3_000 + str(gold), "\\frac{" * 500,
        "\U0001F600" * 10_000, " ".join(str(rng.randint(0, 9)) for _ in range(20_000)),
        f"\\gcd(10^{{{100_000 + rng.randint(0, 4)}}}!, 7)",  # sympy needs seconds: killed at the limit
    ])


def completions(n: int, seed: int) -> list[tuple[str, str, int]]:
    """(kind, completion, gold number) per completion; about one in ten repeats an earlier one."""
    rng = random.Random(seed)
    makers = {"short": short_answer, "latex": latex_answer, "prose": prose_answer, "hostile": hostile_answer}
    out: list[tuple[str, str, int]] = []
    for _ in range(n):
        if out and rng.random() < 0.1:
            out.append(rng.choice(out))
            continue
        kind = rng.choices(list(makers), weights=(45, 25, 20, 10))[0]
        gold = rng.randint(1, 20)
        answer = makers[kind](rng, gold)
        tagged = rng.random() < 0.9 or kind == "hostile"
        text = f"<think>{prose_answer(rng, gold)}</think><answer>{answer}</answer>" if tagged else answer
        out.append((kind, text, gold))
    return out


def columns(name: str, items: list[tuple[str, str, int]]) -> dict[str, Any]:
    """The keyword arguments a reward is called with (TRL's, plus the data columns it reads)."""
    texts = [text for _, text, _ in items]
    solution: list[Any] = {"mcq": ["B"] * len(items), "yes_no": ["yes"] * len(items),
                           "temporal_iou": ["[1.0, 3.0]"] * len(items), "bbox_iou": ["[0, 0, 10, 12]"] * len(items),
                           "ocr": ["the quick brown fox"] * len(items),
                           "free_form": ["the quick brown fox"] * len(items)}.get(name, [str(g) for _, _, g in items])
    return {"prompts": [""] * len(items), "completions": texts, "completion_ids": [[0] * (len(t) // 4) for t in texts],
            "solution": solution, "options": [OPTIONS] * len(items), "max_completion_length": 1024}


def timed(call: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def measure(fn: Callable[..., Any], name: str, items: list[tuple[str, str, int]], batch: int) -> dict[str, Any]:
    per_call = [timed(lambda item=item: fn(**columns(name, [item]))) for item in items]
    batches = [timed(lambda chunk=chunk: fn(**columns(name, chunk))) for chunk in chunks(items, batch)]
    return {"reward": name, "per_call": per_call, "batches": batches}


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def fresh_math_checker() -> None:
    """Close the math-verify worker and forget its verdicts: the next check starts cold."""
    from r1_mm.rewards import math_check

    if math_check._checker is not None:
        math_check._checker.close()
    math_check._checker = None


def accuracy_under_budget(items: list[tuple[str, str, int]], batch: int, budget_s: float) -> tuple[list[float], int]:
    """Batch times through the reward runner with ``rewards.batch_timeout_s``; and the checks skipped."""
    from r1_mm.config.recipe import RewardSpec
    from r1_mm.rewards import math_check
    from r1_mm.rewards.runner import RewardRunner

    fresh_math_checker()
    math_check.checker().equivalent("$1$", "$2$", 60.0)  # the worker's start-up is not a batch's cost
    runner = RewardRunner([RewardSpec(name="accuracy")], on_error="none", batch_timeout_s=budget_s)
    times = []
    for chunk in chunks(items, batch):
        texts = [text for _, text, _ in chunk]
        times.append(timed(lambda chunk=chunk, texts=texts: runner(
            prompts=[""] * len(chunk), completions=texts, completion_ids=[[0]] * len(chunk),
            rows=[{"solution": str(g)} for _, _, g in chunk], row_ids=[str(i) for i in range(len(chunk))])))
    return times, math_check.checker().over_budget


def bomb_batch(count: int, budget_s: float) -> str:
    """One batch of ``count`` distinct LaTeX bombs (each needs seconds of sympy): its accuracy call
    without a budget, the same batch again (every verdict cached), and cold with ``budget_s``."""
    from r1_mm.config.recipe import RewardSpec
    from r1_mm.rewards import math_check
    from r1_mm.rewards.runner import RewardRunner

    texts = [f"<answer>\\gcd(10^{{{100_000 + k}}}!, 7)</answer>" for k in range(count)]
    out = []
    for label, limit in (("no budget", None), ("again, cached", None), (f"batch_timeout_s={budget_s:g}", budget_s)):
        if label != "again, cached":
            fresh_math_checker()
            math_check.checker().equivalent("$1$", "$2$", 60.0)
        runner = RewardRunner([RewardSpec(name="accuracy")], on_error="none", batch_timeout_s=limit)
        seconds = timed(lambda runner=runner: runner(prompts=[""] * count, completions=texts,
                                                     completion_ids=[[0]] * count, rows=[{"solution": "1"}] * count,
                                                     row_ids=[str(i) for i in range(count)]))
        out.append(f"{label} {seconds:.1f} s")
    return f"accuracy on one batch of {count} distinct LaTeX bombs (5 s limit each): " + ", ".join(out)


def row(label: str, per_call: list[float] | None, batches: list[float]) -> str:
    if per_call is None:
        calls = "| - | - | - "
    else:
        calls = (f"| {len(per_call) / sum(per_call):,.0f} | {statistics.median(per_call) * 1e3:.2f} "
                 f"| {max(per_call) * 1e3:,.0f} ")
    return f"| {label} {calls}| {statistics.median(batches):.3f} | {max(batches):.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--budget", type=float, default=10.0, help="rewards.batch_timeout_s for accuracy's budget row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bombs", type=int, default=8, help="LaTeX bombs in the one-batch accuracy case")
    parser.add_argument("--bombs-only", action="store_true", help="only the one-batch LaTeX bomb case")
    args = parser.parse_args()
    if args.bombs_only:
        print(bomb_batch(args.bombs, args.budget))
        return

    from r1_mm.rewards import get, math_check

    items = completions(args.n, args.seed)
    kinds = {k: sum(1 for kind, _, _ in items if kind == k) for k in ("short", "latex", "prose", "hostile")}
    print(f"{args.n} completions ({', '.join(f'{v} {k}' for k, v in kinds.items())}; "
          f"{args.n - len({t for _, t, _ in items})} repeats), batches of {args.batch}\n")
    print("| reward | calls/s | median ms/call | max ms/call | median s/batch | max s/batch |")
    print("|---|---|---|---|---|---|")
    fresh_math_checker()
    math_check.checker().equivalent("$1$", "$2$", 60.0)  # start-up excluded, as in a run
    notes = []
    for name in REWARDS:
        fn = get(name)
        if name != "accuracy":
            result = measure(fn, name, items, args.batch)
            print(row(name, result["per_call"], result["batches"]), flush=True)
            continue
        cold = measure(fn, name, items, args.batch)["per_call"]  # its batches find the verdicts cached
        cold_batches = [sum(part) for part in chunks(cold, args.batch)]
        print(row("accuracy, cold; batch = sum of its calls, no budget", cold, cold_batches), flush=True)
        killed = math_check.checker().timeouts
        again = measure(fn, name, items, args.batch)
        print(row("accuracy, again (verdicts cached)", again["per_call"], again["batches"]), flush=True)
        budgeted, skipped = accuracy_under_budget(items, args.batch, args.budget)
        print(row(f"accuracy, cold, batch_timeout_s={args.budget:g}", None, budgeted), flush=True)
        notes.append(f"accuracy: {killed} math-verify checks killed at the 5 s limit in the cold pass; "
                     f"{skipped} skipped for the batch budget")
    print("\n" + "\n".join([*notes, bomb_batch(args.bombs, args.budget)]))


if __name__ == "__main__":
    main()
