"""Run under `accelerate launch` in place of ``-m r1_mm.train`` (same arguments): the training job, with every
call of ``losses.high_entropy_mask`` (algorithm.grpo.top_entropy_quantile < 1) recorded. After the run each
process writes ``entropy_threshold.rank<N>.json`` into ``training.output_dir``: per call, this process's own
scored-token entropies (the mask's tokens, in order), the size of the pool the threshold came from, the
threshold that pool gives and the tokens the returned mask kept (so a test can recompute the threshold from the
union of both processes' entropies without trusting the pool)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    import torch

    from r1_mm.jobs.train import main as train
    from r1_mm.trainers import losses

    calls: list[dict] = []
    original = losses.high_entropy_mask

    def recorded(entropy, mask, quantile, pool=None):
        kept = original(entropy, mask, quantile, pool)
        b = mask.bool()
        values = entropy.detach()[b].float() if pool is None else pool.float()
        calls.append({"local": entropy.detach()[b].float().tolist(), "kept": kept[b].tolist(),
                      "quantile": quantile, "pool_size": None if pool is None else int(pool.numel()),
                      "threshold": float(torch.quantile(values, 1.0 - quantile))})
        return kept

    losses.high_entropy_mask = recorded
    code = train(sys.argv[1:])
    out_dir = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("training.output_dir="))
    rank = int(os.environ.get("RANK", "0"))
    (Path(out_dir) / f"entropy_threshold.rank{rank}.json").write_text(json.dumps({"calls": calls}))
    return code


if __name__ == "__main__":
    sys.exit(main())
