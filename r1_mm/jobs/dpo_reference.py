"""``r1-mm dpo precompute-ref``: the reference model's log-probabilities of every pair, written into
the data once, so DPO/TPO training with ``algorithm.dpo.precomputed_reference=true`` needs no reference
model (nor its memory)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from r1_mm.config.recipe import RecipeConfig
from r1_mm.data.loading import DataError, load_split, media_root
from r1_mm.data.prompts import PromptBuilder
from r1_mm.models.forward.scoring import score_completions
from r1_mm.run.input_checks import check_generation_job, preference_problems
from r1_mm.run.preflight import check_model
from r1_mm.trainers.preference import response_ids


def precompute_reference(cfg: RecipeConfig, out_path: str | Path) -> int:
    """Write the data file again with ref_chosen_logps / ref_rejected_logps from the reference model,
    so training with algorithm.dpo.precomputed_reference=true needs no reference forward (or memory)."""
    from r1_mm.models.loading import load_model, load_processor  # at call time, as every job loads models

    rows, source, default_root = load_split(cfg.data, "train")
    root = media_root(cfg.data, default_root)
    check_generation_job(cfg, rows, source, root)  # every row before the model loads
    bad_pair = preference_problems(rows, source)
    if bad_pair:
        raise DataError(bad_pair[0])
    check_model(cfg, learner=True)  # a verified family in this forward mode (the recipe that will train)
    processor = load_processor(cfg.model)
    model = load_model(cfg.model, trainable=False, grouped=cfg.training.forward_mode == "grouped").eval()
    builder = PromptBuilder(processor, cfg.data, cfg.media, root)
    tokenizer = processor.tokenizer
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with out_path.open("w") as out, torch.no_grad():
        for index, row in enumerate(rows):
            sample = builder.prepare(row, index)
            ids = [response_ids(tokenizer, row.get(f), sample.row_id, f) for f in ("chosen", "rejected")]
            logps, _, mask = score_completions(model, [sample], ids, 2, tokenizer.pad_token_id, temperature=1.0,
                                               mode=cfg.training.forward_mode)
            seq = (logps * mask).sum(-1)
            out.write(json.dumps({**row, "ref_chosen_logps": float(seq[0]), "ref_rejected_logps": float(seq[1])}) + "\n")
            written += 1
    return written
