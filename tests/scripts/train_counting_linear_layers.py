"""Run under `accelerate launch` in place of ``-m r1_mm.train`` (same arguments): the training job, with every
call of the packed linear-attention path (``packed_linear_attention.packed_forward``) recorded. After the run
each process writes ``linear_calls.rank<N>.json`` into ``training.output_dir``: how many packed calls ran and
whether the layer's parameters were ZeRO-3 partitions (``ds_id``, a local shard smaller than the tensor) and, for
the layer's own ``A_log`` / ``dt_bias``, gathered to their full shapes when the packed computation used them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _state(param) -> dict:
    shard = getattr(param, "ds_tensor", None)
    return {"zero3": hasattr(param, "ds_id"), "shard": None if shard is None else shard.numel(),
            "full": getattr(param, "ds_numel", param.numel()), "in_use": param.numel()}


def main() -> int:
    from r1_mm.jobs.train import main as train
    from r1_mm.models.forward import packed_linear_attention

    calls: list[dict] = []
    original = packed_linear_attention.packed_forward

    def recorded(layer, hidden_states, layout):
        # the layer's own parameters and a submodule's, as the packed computation is about to use them
        calls.append({name: _state(p) for name, p in (("A_log", layer.A_log), ("dt_bias", layer.dt_bias))})
        out = original(layer, hidden_states, layout)
        calls[-1]["conv1d.weight"] = _state(layer.conv1d.weight)  # a submodule's (gathered by its own call)
        return out

    packed_linear_attention.packed_forward = recorded
    code = train(sys.argv[1:])
    out_dir = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("training.output_dir="))
    rank = int(os.environ.get("RANK", "0"))
    (Path(out_dir) / f"linear_calls.rank{rank}.json").write_text(json.dumps(
        {"calls": len(calls), "counter": packed_linear_attention.LINEAR_CALLS["linear_attention"], "states": calls}))
    return code


if __name__ == "__main__":
    sys.exit(main())
