"""One GRPO learner step on identical inputs: r1-mm vs TRL's GRPOTrainer, same model and device.

A step = reference logprobs (no grad) + policy logprobs + loss + backward + optimizer step, given
the same prompts, completions and advantages (generation is benchmarked in bench/rollout.py).

Cases:
  long   one image prompt with >= 1024 visual tokens, G = 8, 64-token completions, the tiny 512-token vocabulary
  short  a text-only prompt, G = 8, 64-token completions, the tiny 512-token vocabulary
  real   the shapes users run: Qwen2.5-VL's 151,936-token vocabulary, >= 1024 visual tokens, G = 8,
         512-token completions
  real_naive  the ``real`` shapes, r1-mm's grouped forward vs its naive forward (``training.forward_mode=naive``:
         the prompt and its image repeated per completion, what the library's forward does), the same step
         on both sides; the case to run for a family TRL's trainer does not serve (``--family qwen3_5``)
  real_top_p  the ``real`` shapes sampled with top_p = 0.95: r1-mm's truncated head (the learner scores
         the sampler's kept set, docs/sampling.md) vs r1-mm's untruncated head, not vs TRL (TRL scores the
         untruncated softmax whatever the sampler did). Both run the step the trainer runs: the reference
         untruncated; the truncated policy also returns its untruncated logprobs for the KL term.

Each (case, implementation) runs in its own process, so peak memory (RSS, sampled every 2 ms)
is not polluted by the other. Usage:

    .venv/bin/python bench/grpo_step.py            # all cases, prints a markdown table
    .venv/bin/python bench/grpo_step.py --repeats 5
    .venv/bin/python bench/grpo_step.py --cases real --repeats 1
    .venv/bin/python bench/grpo_step.py --cases real_top_p --repeats 5   # truncated vs untruncated head
    .venv/bin/python bench/grpo_step.py --cases real_naive --family qwen3_5 --repeats 1 --rounds 3

``--family`` picks the tiny model's family (default Qwen2.5-VL). ``--rounds N`` runs every worker N times,
the implementations interleaved (a, b, a, b, ..), so load from other work on a shared machine falls on
both; the table then pools the timed steps of all rounds and gives the median of the rounds' peaks.

Every step after the warm-up is timed: the table gives the median and the min-max spread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

G = 8
BETA = 0.04


@dataclass(frozen=True)
class Case:
    image: bool
    completion_tokens: int
    vocab: int | None = None  # None: the tiny tokenizer's (512)
    top_p: float = 1.0  # < 1: compare the truncated head with the untruncated one (not with TRL)
    naive: bool = False  # compare r1-mm's grouped forward with its naive forward (not with TRL)


CASES = {"long": Case(image=True, completion_tokens=64), "short": Case(image=False, completion_tokens=64),
         "real": Case(image=True, completion_tokens=512, vocab=151_936),
         "real_naive": Case(image=True, completion_tokens=512, vocab=151_936, naive=True),
         "real_top_p": Case(image=True, completion_tokens=512, vocab=151_936, top_p=0.95)}


def implementations(case: str) -> tuple[str, str]:
    """(baseline, r1-mm variant) compared in a case."""
    if CASES[case].naive:
        return ("r1-mm-naive", "r1-mm")
    return ("r1-mm", "r1-mm-truncated") if CASES[case].top_p < 1.0 else ("trl", "r1-mm")


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` is the maximum seen (MiB)."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)
            time.sleep(0.002)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss / 2**20
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def time_steps(step, params, repeats: int) -> tuple[list[float], float]:
    """Seconds of each ``step(optimizer)`` after one warm-up step, and the peak RSS (MiB) meanwhile."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=1e-5)
    step(optimizer)  # warm-up (allocations, kernels)
    times = []
    with PeakRSS() as mem:
        for _ in range(repeats):
            t0 = time.perf_counter()
            step(optimizer)
            times.append(time.perf_counter() - t0)
    return times, mem.peak


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def bench_model_path(vocab: int | None = None, family: str = "qwen2_5_vl") -> Path:
    from r1_mm.models.tiny import TinySpec, tiny_model_path

    spec = TinySpec(family=family, hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=4, intermediate_size=512,
                    vision_hidden_size=128, vision_depth=4, vision_heads=4, max_pixels=28 * 28 * 1280,
                    model_vocab_size=vocab)
    return tiny_model_path(spec)


def make_inputs(case: str, processor, tmp: Path):
    """Prompt inputs (our Sample.inputs form), completions and advantages, seeded."""
    import torch
    from PIL import Image

    from r1_mm.config.recipe import DataConfig, MediaConfig
    from r1_mm.data import PromptBuilder

    if CASES[case].image:
        img = Image.new("RGB", (896, 896))
        img.paste((200, 30, 30), (100, 100, 400, 400))
        img.save(tmp / "big.png")
        row = {"image": "big.png", "prompt": "How many squares are in the image?"}
        media = MediaConfig(min_pixels=896 * 896, max_pixels=896 * 896)
    else:
        row = {"prompt": "What is the capital of France? Answer in one word."}
        media = MediaConfig()
    builder = PromptBuilder(processor, DataConfig(max_prompt_length=4096), media, tmp)
    sample = builder.prepare(row, 0)
    gen = torch.Generator().manual_seed(0)
    completions = [torch.randint(0, 400, (CASES[case].completion_tokens,), generator=gen).tolist() for _ in range(G)]
    advantages = torch.randn(G, generator=gen)
    return sample, completions, advantages


def run_ours(model, ref, processor, sample, completions, advantages, optimizer, truncation=None, naive=False):
    """The trainer's step (grpo.py ``update``); with ``truncation`` the policy scores the kept set and
    also returns the untruncated logprobs the KL term uses, the reference stays untruncated; ``naive``:
    both models score through the naive forward (``training.forward_mode=naive``)."""
    import torch

    from r1_mm.models.forward.grouped import grouped_logprobs, naive_logprobs, pack_groups, pad_completions
    from r1_mm.trainers.losses import LossSettings, policy_loss

    pad = processor.tokenizer.pad_token_id
    if naive:
        with torch.no_grad():
            ref_logps, _ = naive_logprobs(ref, [dict(sample.inputs)], completions, G, pad)
        logps, _ = naive_logprobs(model, [dict(sample.inputs)], completions, G, pad, with_entropy=True)
        _, mask = pad_completions(completions, pad, logps.device)
        settings = LossSettings(loss_type="dapo", beta=BETA, epsilon_high=0.28, max_completion_length=len(completions[0]))
        out = policy_loss(logps, logps.detach(), advantages, mask, settings, ref_logps=ref_logps)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return
    with torch.no_grad():
        ref_logps, _ = grouped_logprobs(ref, pack_groups(ref, [dict(sample.inputs)], completions, G, pad))
    packed = pack_groups(model, [dict(sample.inputs)], completions, G, pad)
    kl_logps = None
    if truncation is None:
        logps, _ = grouped_logprobs(model, packed, with_entropy=True)
    else:
        logps, _, kl_logps = grouped_logprobs(model, packed, with_entropy=True, truncation=truncation,
                                              with_full_logps=True)
    settings = LossSettings(loss_type="dapo", beta=BETA, epsilon_high=0.28, max_completion_length=len(completions[0]))
    out = policy_loss(logps, logps.detach(), advantages, packed.completion_mask, settings, ref_logps=ref_logps,
                      kl_logps=kl_logps)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trl_setup(model, processor, tmp: Path, completion_tokens: int):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(output_dir=str(tmp / "trl"), use_cpu=True, bf16=False, report_to=[], loss_type="dapo",
                        beta=BETA, epsilon_high=0.28, num_generations=G, per_device_train_batch_size=G,
                        max_completion_length=completion_tokens)
    trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                          args=config, train_dataset=Dataset.from_list([{"prompt": "x"}] * G),
                          processing_class=processor)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def trl_inputs(sample, completions, advantages, processor):
    import torch

    from r1_mm.models.forward.grouped import pad_completions

    p = sample.inputs
    prompt_ids = p["input_ids"].repeat(G, 1)
    prompt_mask = p["attention_mask"].repeat(G, 1)
    completion_ids, completion_mask = pad_completions(completions, processor.tokenizer.pad_token_id,
                                                      torch.device("cpu"))
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages,
              "num_items_in_batch": completion_mask.sum()}
    if "pixel_values" in p:
        inputs.update(pixel_values=p["pixel_values"].repeat(G, 1), image_grid_thw=p["image_grid_thw"].repeat(G, 1),
                      num_images=[1] * G)
    if "mm_token_type_ids" in p:
        inputs["mm_token_type_ids"] = torch.cat([p["mm_token_type_ids"].repeat(G, 1),
                                                 torch.zeros_like(completion_ids)], dim=1)
    return inputs


def run_trl(trainer, ref, inputs, optimizer):
    import torch

    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "num_images", "mm_token_type_ids") if k in inputs}
    with torch.no_grad():  # TRL computes reference logprobs with the same helper, on the reference model
        ref_logps, _, _ = trainer._get_per_token_logps_and_entropies(
            ref, input_ids, attention, inputs["completion_ids"].shape[1], **extra)
    loss = trainer._compute_loss(trainer.model, dict(inputs, ref_per_token_logps=ref_logps))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def spy_kept_sets() -> dict:
    """Count the kept-set sizes the truncated head chooses (rows, their sum and minimum)."""
    from r1_mm.trainers import truncated_scores

    stats = {"rows": 0, "sum": 0, "min": None}
    original = truncated_scores.kept_threshold

    def spied(scaled, truncation):
        threshold = original(scaled, truncation)
        sizes = (scaled >= threshold[:, None]).sum(-1)
        stats["rows"] += int(sizes.numel())
        stats["sum"] += int(sizes.sum())
        low = int(sizes.min())
        stats["min"] = low if stats["min"] is None else min(stats["min"], low)
        return threshold

    truncated_scores.kept_threshold = spied
    return stats


def worker(case: str, impl: str, repeats: int, family: str = "qwen2_5_vl") -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from r1_mm.models.forward import packed_linear_attention
    from r1_mm.models.forward.truncated_scores import Truncation

    torch.manual_seed(0)
    path = bench_model_path(CASES[case].vocab, family)
    processor = AutoProcessor.from_pretrained(path)
    tmp = Path(tempfile.mkdtemp())
    sample, completions, advantages = make_inputs(case, processor, tmp)
    model = AutoModelForImageTextToText.from_pretrained(path)
    ref = AutoModelForImageTextToText.from_pretrained(path).eval().requires_grad_(False)
    if impl == "trl":
        trainer = trl_setup(model, processor, tmp, CASES[case].completion_tokens)
        inputs = trl_inputs(sample, completions, advantages, processor)
        from trl.trainer.utils import add_fused_lm_head  # TRL scores the reference with its fused head too

        add_fused_lm_head(ref, temperature=1.0)
        step = lambda opt: run_trl(trainer, ref, inputs, opt)  # noqa: E731
        params = trainer.model.parameters()
    else:
        truncation = None
        if impl == "r1-mm-truncated":
            truncation = Truncation(top_p=CASES[case].top_p)
            kept = spy_kept_sets()
        naive = impl == "r1-mm-naive"
        step = lambda opt: run_ours(model, ref, processor, sample, completions, advantages, opt, truncation, naive)  # noqa: E731
        params = model.parameters()
    linear = packed_linear_attention.LINEAR_CALLS["linear_attention"]
    times, peak = time_steps(step, params, repeats)
    linear = packed_linear_attention.LINEAR_CALLS["linear_attention"] - linear
    if impl != "trl" and not naive and packed_linear_attention.linear_layers(model) and not linear:
        sys.exit("the packed linear-attention path never ran")  # the premise of a hybrid family's grouped figures
    extra = {"packed_linear_calls": linear, "family": model.config.model_type}
    if impl == "r1-mm-truncated":  # the premise: the truncated head ran and cut tokens
        if not kept["rows"]:
            sys.exit("the truncated head never ran")
        extra.update(kept_mean=kept["sum"] / kept["rows"], kept_min=kept["min"])
    return {"case": case, "impl": impl, "seconds": median(times), "min_s": min(times), "max_s": max(times),
            "repeats": len(times), "times": times, "peak_rss_mib": peak, **extra,
            "prompt_tokens": int(sample.num_prompt_tokens), "vocab": model.config.get_text_config().vocab_size,
            "completion_tokens": CASES[case].completion_tokens,
            "visual_tokens": int(sample.inputs["image_grid_thw"].prod() // 4) if "image_grid_thw" in sample.inputs else 0,
            "torch_threads": torch.get_num_threads()}


def run_workers(script: str, jobs: list[tuple[str, str]], repeats: int, extra_args: tuple[str, ...] = ()
                ) -> dict[tuple[str, str], dict]:
    """Each (first, second) job in a process of its own (``script --worker first second``), so its peak
    memory is its own; returns each worker's RESULT line."""
    results = {}
    for job in jobs:
        out = subprocess.run([sys.executable, script, "--worker", *job, "--repeats", str(repeats), *extra_args],
                             capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            sys.exit(f"worker {'/'.join(job)} failed:\n{out.stderr[-3000:]}")
        results[job] = json.loads(line[0][7:])
        # as each worker ends, so a long run interrupted part-way still leaves its figures
        print(f"{'/'.join(job)}: {line[0][7:]}", file=sys.stderr, flush=True)
    return results


def pooled(rounds: list[dict]) -> dict:
    """One worker's results over interleaved rounds: every timed step pooled, the median of the rounds' peaks
    (with their min-max)."""
    times = [t for r in rounds for t in r["times"]]
    peaks = [r["peak_rss_mib"] for r in rounds]
    return dict(rounds[0], seconds=median(times), min_s=min(times), max_s=max(times), repeats=len(times), times=times,
                peak_rss_mib=median(peaks), peak_min=min(peaks), peak_max=max(peaks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="long,short")
    ap.add_argument("--family", default="qwen2_5_vl", help="the tiny model's family (r1_mm/models/families)")
    ap.add_argument("--rounds", type=int, default=1, help="run every worker this many times, interleaved")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], args.worker[1], args.repeats, args.family)))
        return
    cases = args.cases.split(",")
    for vocab in {CASES[c].vocab for c in cases}:
        bench_model_path(vocab, args.family)  # build once before the workers race for it
    jobs = [(case, impl) for case in cases for impl in implementations(case)]
    rounds = [run_workers(__file__, jobs, args.repeats, ("--family", args.family)) for _ in range(args.rounds)]
    results = {job: pooled([r[job] for r in rounds]) for job in jobs}
    for job, r in results.items():
        print(f"{'/'.join(job)}: steps s {[round(t, 3) for t in r['times']]}, peaks MiB "
              f"{[round(x[job]['peak_rss_mib']) for x in rounds]}")
    print(f"GRPO learner step, {args.family}, G={G}, beta={BETA}, median (min-max) of {args.repeats} timed step(s) "
          f"after a warm-up step x {args.rounds} interleaved round(s), "
          f"{results[next(iter(results))]['torch_threads']} torch threads, CPU")
    versus_trl = [c for c in cases if implementations(c)[0] == "trl"]
    naive = [c for c in cases if CASES[c].naive]
    truncated = [c for c in cases if c not in versus_trl and c not in naive]
    if naive:
        print()
        print("| case | family | vocabulary | prompt tokens (visual) | completion tokens | naive s | grouped s | speed-up | "
              "naive peak RSS MiB | grouped peak RSS MiB | grouped / naive memory |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in naive:
        n, o = results[(case, "r1-mm-naive")], results[(case, "r1-mm")]
        print(f"| {case} | {o['family']} | {o['vocab']} | {o['prompt_tokens']} ({o['visual_tokens']}) | "
              f"{o['completion_tokens']} | {spread(n)} | {spread(o)} | {n['seconds'] / o['seconds']:.2f}x | "
              f"{peaks(n)} | {peaks(o)} | {o['peak_rss_mib'] / n['peak_rss_mib']:.2f} |")
    if versus_trl:
        print()
        print("| case | vocabulary | prompt tokens (visual) | completion tokens | TRL s | r1-mm s | speed-up | "
              "TRL peak RSS MiB | r1-mm peak RSS MiB | r1-mm / TRL memory |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for case in versus_trl:
        t, o = results[(case, "trl")], results[(case, "r1-mm")]
        print(f"| {case} | {o['vocab']} | {o['prompt_tokens']} ({o['visual_tokens']}) | {o['completion_tokens']} | "
              f"{spread(t)} | {spread(o)} | {t['seconds'] / o['seconds']:.2f}x | {t['peak_rss_mib']:.0f} | "
              f"{o['peak_rss_mib']:.0f} | {o['peak_rss_mib'] / t['peak_rss_mib']:.2f} |")
    if truncated:
        print()
        print("| case | vocabulary | prompt tokens (visual) | completion tokens | top_p | kept tokens mean (min) | "
              "untruncated head s | truncated head s | truncated / untruncated time | untruncated peak RSS MiB | "
              "truncated peak RSS MiB | truncated / untruncated memory |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case in truncated:
        u, t = results[(case, "r1-mm")], results[(case, "r1-mm-truncated")]
        print(f"| {case} | {t['vocab']} | {t['prompt_tokens']} ({t['visual_tokens']}) | {t['completion_tokens']} | "
              f"{CASES[case].top_p} | {t['kept_mean']:.0f} ({t['kept_min']}) | {spread(u)} | {spread(t)} | "
              f"{t['seconds'] / u['seconds']:.2f}x | {u['peak_rss_mib']:.0f} | {t['peak_rss_mib']:.0f} | "
              f"{t['peak_rss_mib'] / u['peak_rss_mib']:.2f} |")


def peaks(result: dict) -> str:
    """Peak RSS (MiB); over several rounds the median with the rounds' min-max."""
    if result.get("peak_min") == result.get("peak_max"):
        return f"{result['peak_rss_mib']:.0f}"
    return f"{result['peak_rss_mib']:.0f} ({result['peak_min']:.0f}-{result['peak_max']:.0f})"


def spread(result: dict) -> str:
    """Median seconds with the min-max of the timed steps."""
    return f"{result['seconds']:.3f} ({result['min_s']:.3f}-{result['max_s']:.3f})"


if __name__ == "__main__":
    main()
