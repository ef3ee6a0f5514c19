"""One DPO learner step on identical long-visual-prompt pairs: r1-mm vs TRL's DPOTrainer.

A step = reference logprobs (no grad) + policy logprobs of chosen and rejected + sigmoid loss +
backward + optimizer step. TRL runs chosen and rejected as two full rows (prompt and image twice);
r1-mm runs the prompt and image once and both responses in one grouped row. Each implementation
runs in its own process (peak RSS sampled every 2 ms). Usage:

    .venv/bin/python bench/dpo_step.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from grpo_step import bench_model_path, make_inputs, time_steps  # noqa: E402

RESPONSE_TOKENS = 64
BETA = 0.1


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


def worker(impl: str, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    path = bench_model_path()
    processor = AutoProcessor.from_pretrained(path)
    tmp = Path(tempfile.mkdtemp())
    sample, completions, _ = make_inputs("long", processor, tmp)
    chosen, rejected = completions[0][:RESPONSE_TOKENS], completions[1][:RESPONSE_TOKENS]
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
        from r1_mm.trainers.preference_losses import PreferenceLossSettings, preference_loss
        from r1_mm.trainers.scoring import score_completions

        settings = PreferenceLossSettings(beta=BETA)
        params = model.parameters()

        def step(opt):
            with torch.no_grad():
                ref_logps, _, mask = score_completions(ref, [sample], [chosen, rejected], 2, pad, temperature=1.0,
                                                       mode="grouped")
            seq = (ref_logps * mask).sum(-1)
            logps, _, mask = score_completions(model, [sample], [chosen, rejected], 2, pad, temperature=1.0,
                                               mode="grouped", with_entropy=True)
            preference_loss(logps, mask, seq[0::2], seq[1::2], settings).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    seconds, peak = time_steps(step, params, repeats)
    return {"impl": impl, "seconds": seconds, "peak_rss_mib": peak,
            "prompt_tokens": int(sample.num_prompt_tokens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.repeats)))
        return
    bench_model_path()
    results = {}
    for impl in ("trl", "r1-mm"):
        out = subprocess.run([sys.executable, __file__, "--worker", impl, "--repeats", str(args.repeats)],
                             capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            sys.exit(f"worker {impl} failed:\n{out.stderr[-3000:]}")
        results[impl] = json.loads(line[0][7:])
    t, o = results["trl"], results["r1-mm"]
    print(f"DPO learner step, 1 pair, {RESPONSE_TOKENS}-token responses, median of {args.repeats}, CPU\n")
    print("| prompt tokens | TRL s | r1-mm s | speed-up | TRL peak RSS MiB | r1-mm peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    print(f"| {o['prompt_tokens']} | {t['seconds']:.3f} | {o['seconds']:.3f} | {t['seconds'] / o['seconds']:.2f}x | "
          f"{t['peak_rss_mib']:.0f} | {o['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
