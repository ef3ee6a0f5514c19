"""Run under `accelerate launch` (2 processes, DeepSpeed ZeRO-3): the tiled LM head vs the model's own
full-logits forward, both through the DeepSpeed engine on partitioned weights (under the recipe's
rollout.top_p / top_k truncation when it sets one). Writes
{logps, entropy, gradient} max differences and what ran (rank 0) to the JSON path given."""

from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    from deepspeed.utils import safe_get_full_grad

    from r1_mm.config.recipe import load_recipe
    from r1_mm.data import PromptStream
    from r1_mm.models.forward.grouped import grouped_logprobs, pack_groups, token_logprobs
    from r1_mm.models.forward.truncated_scores import Truncation
    from r1_mm.rollout.base import media_token_ids
    from r1_mm.run import info as run_info
    from r1_mm.trainers.backend import build_learner

    out_path, recipe, *overrides = sys.argv[1:]
    cfg = load_recipe(recipe, overrides)
    learner = build_learner(cfg, need_reference=False)
    acc, engine = learner.accelerator, learner.policy
    stream = PromptStream.from_config(learner.processor, cfg.data, cfg.media, seed=0,
                                      shard=(acc.process_index, acc.num_processes))
    samples = stream.next_batch(2)
    gen = torch.Generator().manual_seed(acc.process_index)
    completions = [torch.randint(0, 60, (n,), generator=gen).tolist() for n in (5, 3, 6, 2, 4, 7)]
    suppressed = media_token_ids(learner.unwrapped.config)
    pad = learner.processor.tokenizer.pad_token_id
    truncation = Truncation(cfg.rollout.top_p, cfg.rollout.top_k)  # active: the truncated head's own backward

    def run(fused: bool):
        packed = pack_groups(engine, [dict(s.inputs) for s in samples], completions, 3, pad)
        if fused:
            logps, entropy = grouped_logprobs(engine, packed, temperature=0.7, with_entropy=True, suppressed_ids=suppressed,
                                              truncation=truncation)
        else:
            out = engine(**packed.model_kwargs(engine), logits_to_keep=packed.logits_index, use_cache=False)
            lp, ent = token_logprobs(out.logits[0], packed.targets, 0.7, True, suppressed, truncation)
            logps, entropy = packed.to_completion_grid(lp), packed.to_completion_grid(ent)
        weights = torch.linspace(-1.0, 1.5, logps.numel()).reshape(logps.shape)
        engine.backward((logps * weights).sum() + (entropy * weights.flip(0)).sum())
        grads = {n: safe_get_full_grad(p).clone() for n, p in learner.unwrapped.named_parameters() if p.requires_grad}
        engine.optimizer.zero_grad()
        mask = packed.completion_mask.bool()
        return logps[mask].detach(), entropy[mask].detach(), grads

    lp_f, ent_f, g_f = run(fused=True)
    lp_r, ent_r, g_r = run(fused=False)
    largest = max(float(g.abs().max()) for g in g_r.values())
    result = {
        "logps": float((lp_f - lp_r).abs().max()), "entropy": float((ent_f - ent_r).abs().max()),
        "grad_rel": max(float((g_f[n] - g).abs().max()) / max(float(g.abs().max()), 1e-3 * largest) for n, g in g_r.items()),
        "lm_head_grad": float(g_r["lm_head.weight"].abs().sum()),
        "truncated": truncation.active,
        "info": run_info.collect(cfg, learner, engine=None),
    }
    if acc.is_main_process:
        with open(out_path, "w") as f:
            json.dump(result, f, default=str)


if __name__ == "__main__":
    main()
