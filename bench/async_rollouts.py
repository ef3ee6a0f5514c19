"""Synchronous vs asynchronous GRPO (``rollout.max_staleness``) on the same recipe: end-to-end tokens/s and
the learner's and sampler's idle shares, per engine.

Each (engine, K) is one real training run of ``--steps`` steps on the synthetic counting task and a tiny
model (the first step, with its warm-up, is left out of the medians). With vllm_pool the servers sample
while the learner trains (K >= 1); with hf the engine interleaves with the learner, so K >= 1 changes which
weights sample, not how much runs at once. On a machine with few cores the pool's server and the learner
compete for them, so the gain measured here is a floor. Usage:

    .venv/bin/python bench/async_rollouts.py                       # vllm_pool, K = 0 and 1
    .venv/bin/python bench/async_rollouts.py --engines hf vllm_pool --staleness 0 1 2 --steps 8
    .venv/bin/python bench/async_rollouts.py --partial 16          # rollout.partial_rollout_tokens for K >= 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


def run(engine: str, k: int, steps: int, out: Path, data: Path, args: argparse.Namespace) -> list[dict]:
    from r1_mm.config.recipe import load_recipe
    from r1_mm.run.tracking import read_metrics
    from r1_mm.trainers.grpo import GRPOTrainer

    overrides = [
        f"model.name_or_path={args.model}", f"data.train_path={data}", f"training.output_dir={out}",
        "data.format_instruction=null", "media.max_pixels=12544", "media.min_pixels=12544",
        f"rollout.num_generations={args.generations}", f"rollout.max_completion_length={args.tokens}",
        f"training.prompts_per_step={args.prompts}", f"training.max_steps={steps}", "training.save_steps=null",
        "logging.progress_bar=false", "rewards.functions=[{name: numeric, kwargs: {require_tag: false}}]",
        f"rollout.engine={engine}", f"rollout.max_staleness={k}", "rollout.pool_size=1",
        "rollout.vllm_dtype=float32", "rollout.vllm_max_model_len=2048", "data.max_prompt_length=1024"]
    if args.partial and k:
        overrides.append(f"rollout.partial_rollout_tokens={args.partial}")
    GRPOTrainer(load_recipe(None, overrides)).train()
    return read_metrics(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=["vllm_pool"])
    parser.add_argument("--staleness", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--partial", type=int, default=0)
    parser.add_argument("--model", default="tiny:qwen2_5_vl:small")
    args = parser.parse_args()

    from r1_mm.testing import synthetic

    root = Path(tempfile.mkdtemp(prefix="r1mm-bench-async-"))
    data = synthetic.make_counting_task(root / "data", 64, seed=1)
    print("| engine | K | e2e tokens/s (median) | learner idle | sampler idle | mean staleness |")
    print("|---|---|---|---|---|---|")
    for engine in args.engines:
        for k in args.staleness:
            metrics = run(engine, k, args.steps, root / f"{engine}-k{k}", data, args)[1:]
            tps = statistics.median(m["throughput/e2e_tokens_per_s"] for m in metrics)
            idle = [statistics.median(m.get(key, float("nan")) for m in metrics)
                    for key in ("async/learner_idle_frac", "async/sampler_idle_frac", "async/token_staleness_mean")]
            print(f"| {engine} | {k} | {tps:.1f} | {idle[0]:.2f} | {idle[1]:.2f} | {idle[2]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
