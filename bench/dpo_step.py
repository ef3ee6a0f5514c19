"""One DPO learner step on identical long-visual-prompt pairs: r1-mm vs TRL's DPOTrainer.

A step = reference logprobs (no grad) + policy logprobs of chosen and rejected + sigmoid loss +
backward + optimizer step. TRL runs chosen and rejected as two full rows (prompt and image twice);
r1-mm runs the prompt and image once and both responses in one grouped row. Each implementation
runs in its own process (peak RSS sampled every 2 ms). Cases: ``toy`` (the tiny 512-token vocabulary,
64-token responses) and ``real`` (Qwen2.5-VL's 151,936-token vocabulary, 512-token responses), both
with a 1,024-visual-token image prompt. Usage:

    .venv/bin/python bench/dpo_step.py --repeats 3
    .venv/bin/python bench/dpo_step.py --cases real --repeats 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from grpo_step import CASES, bench_model_path, make_inputs, median, run_workers, time_steps  # noqa: E402

BETA = 0.1
PROMPTS = {"toy": "long", "real": "real"}  # the GRPO bench case whose prompt, vocabulary and lengths are used


def trl_batch(sample, chosen: list[int], rejected: list[int], pad: int):
    import torch

    p = sample.inputs
    rows = [torch.cat([p["input_ids"][0], torch.tensor(r)]) for r in (chosen, rejected)]
    width = max(len(r) for r in rows)
    n = p["input_ids"].shape[1]
    input_ids = torch.full((2, width), pad)
    attention, completion, mm = (torch.zeros((2, width), dtype=torch.long) for _ in range(3))
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = row
        attention[i, :len(row)] = 1
        completion[i, n:len(row)] = 1
        mm[i, :n] = p["mm_token_type_ids"][0]
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion,
            "mm_token_type_ids": mm, "pixel_values": p["pixel_values"].repeat(2, 1),
            "image_grid_thw": p["image_grid_thw"].repeat(2, 1)}


def worker(case: str, impl: str, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    shape = CASES[PROMPTS[case]]
    path = bench_model_path(shape.vocab)
    processor = AutoProcessor.from_pretrained(path)
    tmp = Path(tempfile.mkdtemp())
    sample, completions, _ = make_inputs(PROMPTS[case], processor, tmp)
    chosen, rejected = completions[0], completions[1]
    model = AutoModelForImageTextToText.from_pretrained(path)
    ref = AutoModelForImageTextToText.from_pretrained(path).eval().requires_grad_(False)
    pad = processor.tokenizer.pad_token_id
    if impl == "trl":
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(output_dir=str(tmp / "trl"), use_cpu=True, bf16=False, report_to=[], beta=BETA,
                           max_length=None)
        trainer = DPOTrainer(model=model, ref_model=ref, args=config, processing_class=processor,
                             train_dataset=Dataset.from_list([{"prompt": "x", "chosen": "a", "rejected": "b"}]))
        batch = trl_batch(sample, chosen, rejected, pad)
        params = trainer.model.parameters()

        def step(opt):
            trainer._compute_loss(trainer.model, batch, False).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        from r1_mm.models.forward.scoring import score_completions
        from r1_mm.trainers.preference_batch import PreferenceBatch
        from r1_mm.trainers.preference_losses import PreferenceLossSettings, preference_loss

        settings = PreferenceLossSettings(beta=BETA)
        params = model.parameters()
        pairs = PreferenceBatch([sample], [chosen], [rejected])
        rows = pairs.rows

        def step(opt):
            with torch.no_grad():
                ref_logps, _, mask = score_completions(ref, pairs.samples, pairs.completions, 2, pad, temperature=1.0,
                                                       mode="grouped")
            seq = (ref_logps * mask).sum(-1)
            logps, _, mask = score_completions(model, pairs.samples, pairs.completions, 2, pad, temperature=1.0,
                                               mode="grouped", with_entropy=True)
            preference_loss(logps, mask, rows, seq[rows.chosen], seq[rows.rejected], settings).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    times, peak = time_steps(step, params, repeats)
    return {"case": case, "impl": impl, "seconds": median(times), "min_s": min(times), "max_s": max(times),
            "peak_rss_mib": peak,
            "prompt_tokens": int(sample.num_prompt_tokens), "response_tokens": len(chosen),
            "vocab": model.config.get_text_config().vocab_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="toy")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], args.worker[1], args.repeats)))
        return
    cases = args.cases.split(",")
    for case in cases:
        bench_model_path(CASES[PROMPTS[case]].vocab)
    results = run_workers(__file__, [(case, impl) for case in cases for impl in ("trl", "r1-mm")], args.repeats)
    print(f"DPO learner step, 1 pair, median (min-max) of {args.repeats} after a warm-up step, CPU\n")
    print("| case | vocabulary | prompt tokens | response tokens | TRL s | r1-mm s | speed-up | TRL peak RSS MiB | "
          "r1-mm peak RSS MiB | r1-mm / TRL memory |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        t, o = results[(case, "trl")], results[(case, "r1-mm")]
        print(f"| {case} | {o['vocab']} | {o['prompt_tokens']} | {o['response_tokens']} | {t['seconds']:.3f} "
              f"({t['min_s']:.3f}-{t['max_s']:.3f}) | {o['seconds']:.3f} ({o['min_s']:.3f}-{o['max_s']:.3f}) | "
              f"{t['seconds'] / o['seconds']:.2f}x | {t['peak_rss_mib']:.0f} | "
              f"{o['peak_rss_mib']:.0f} | {o['peak_rss_mib'] / t['peak_rss_mib']:.2f} |")


if __name__ == "__main__":
    main()
