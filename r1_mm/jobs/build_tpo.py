"""``r1-mm tpo build``: Temporal Preference Optimization pairs from video rows, by self-training.

As in the TPO paper, two granularities:

- localized (rows with a ``segment`` [start, end] in seconds): the policy answers the row's question
  from the segment's frames (preferred) and from the video with the segment cut out (dispreferred);
- comprehensive: from all frames (preferred) and from a sparse or shuffled subset (dispreferred).

Answers come from the recipe's rollout engine. A pair whose answers agree carries no preference and is
dropped (rule: same normalised text; or critic: the judge calls it a tie). The output rows keep the
original video reference, so the preference trainer sees the full video with both answers.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1_mm.config.recipe import ConfigError, RecipeConfig
from r1_mm.data.frame_views import segment_split, select_frames, sparse_indices, with_videos
from r1_mm.data.loading import load_split, media_root
from r1_mm.data.prompts import PromptBuilder, Sample
from r1_mm.rewards.parsing import normalise

log = logging.getLogger(__name__)


@dataclass
class TPOSettings:
    kinds: tuple[str, ...] = ("localized", "comprehensive")
    degrade: str = "sparse"  # comprehensive pairs: "sparse" (keep_fraction of frames) or "shuffle"
    keep_fraction: float = 0.25
    agreement: str = "rule"  # "rule" or "critic" (pairwise judge; ties dropped)
    critic_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass
class TPOReport:
    written: int = 0
    counts: Counter = field(default_factory=Counter)


def _views(sample: Sample, row: dict[str, Any], processor: Any, s: TPOSettings, frame_factor: int,
           rng: random.Random) -> list[tuple[str, Sample, Sample]]:
    """(kind, preferred view, dispreferred view) for one video sample."""
    video = sample.videos[0]
    views = []
    segment = row.get("segment")
    if "localized" in s.kinds and isinstance(segment, (list, tuple)) and len(segment) == 2:
        inside, outside = segment_split(video, float(segment[0]), float(segment[1]))
        if len(inside) >= frame_factor and len(outside) >= frame_factor:
            views.append(("localized",
                          with_videos(sample, processor, [select_frames(video, inside, frame_factor)]),
                          with_videos(sample, processor, [select_frames(video, outside, frame_factor)])))
    if "comprehensive" in s.kinds:
        if s.degrade == "shuffle":
            order = list(range(video.num_frames))
            rng.shuffle(order)
            worse = select_frames(video, order, frame_factor)
        else:
            worse = select_frames(video, sparse_indices(video, s.keep_fraction), frame_factor)
        views.append(("comprehensive", sample, with_videos(sample, processor, [worse])))
    return views


def build_tpo_pairs(cfg: RecipeConfig, out_path: str | Path, settings: TPOSettings | None = None,
                    engine: Any = None) -> TPOReport:
    from r1_mm.models.loading import load_for_inference, load_processor
    from r1_mm.rollout import make_engine
    from r1_mm.run.context import RunContext
    from r1_mm.run.folder import writable_problem
    from r1_mm.run.input_checks import check_generation_job
    from r1_mm.run.preflight import check_model

    s = settings or TPOSettings()
    out_path = Path(out_path)
    unwritable = writable_problem(out_path.parent, "--out folder")
    if unwritable:
        raise ConfigError(unwritable)
    rows, source, default_root = load_split(cfg.data, "train")
    root = media_root(cfg.data, default_root)
    check_generation_job(cfg, rows, source, root)
    check_model(cfg)  # a verified family, on this engine
    processor = load_processor(cfg.model)
    with RunContext(cfg) as run:  # the engine (and its servers) released however the job ends
        if engine is None:
            model = load_for_inference(cfg.model, cfg.rollout.engine)
            engine = make_engine(cfg.rollout.engine, model=model, processor=processor, cfg=cfg)
        run.on_close(engine.close)
        report = _build(cfg, rows, root, processor, engine, s, out_path)
    log.info("TPO pairs: %d written to %s (%s)", report.written, out_path, dict(report.counts))
    return report


def _build(cfg: RecipeConfig, rows: list[dict[str, Any]], root: Path, processor: Any, engine: Any, s: TPOSettings,
           out_path: Path) -> TPOReport:
    from r1_mm.rollout import SamplingSettings

    builder = PromptBuilder(processor, cfg.data, cfg.media, root)
    judge = None
    if s.agreement == "critic":
        from r1_mm.rewards.critic.judge import CriticSettings, get_judge

        judge = get_judge(CriticSettings(mode="pairwise", **s.critic_kwargs))
    rng = random.Random(s.seed)
    report = TPOReport()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sampling = SamplingSettings.from_config(cfg.rollout, seed=s.seed)
    with out_path.open("w") as out:
        for index, row in enumerate(rows):
            sample = builder.prepare(row, index)
            if not sample.videos:
                report.counts["skipped_no_video"] += 1
                continue
            for kind, good, bad in _views(sample, row, processor, s, cfg.media.frame_factor, rng):
                answers = engine.generate([good, bad], 1, sampling)
                chosen, rejected = (a.completions[0].text.strip() for a in answers)
                if not chosen or not rejected or normalise(chosen) == normalise(rejected):
                    report.counts[f"dropped_{kind}_agree"] += 1
                    continue
                if judge is not None:
                    verdict = judge.compare([_question(sample)], [chosen], [rejected], [sample], [None])[0]
                    if verdict in (None, "tie"):
                        report.counts[f"dropped_{kind}_critic_tie"] += 1
                        continue
                    if verdict == "B":
                        chosen, rejected = rejected, chosen  # the judge overrules the view heuristic
                        report.counts[f"{kind}_swapped_by_critic"] += 1
                pair = {k: v for k, v in row.items() if k not in ("solution", "chosen", "rejected")}
                media_key = next(k for k in ("video", "videos") if k in row)
                pair.update({"id": f"{sample.row_id}-{kind}", "chosen": chosen, "rejected": rejected,
                             "tpo_kind": kind, "source_id": sample.row_id,
                             media_key: _absolute(row[media_key], root)})
                out.write(json.dumps(pair) + "\n")
                report.written += 1
                report.counts[kind] += 1
    return report


def _question(sample: Sample) -> str:
    from r1_mm.rewards.critic.reward import question_text

    return question_text(sample.messages)


def _absolute(ref: Any, root: Path) -> Any:
    """Media references made absolute, so the pairs file can live anywhere."""
    if isinstance(ref, list):
        return [_absolute(r, root) for r in ref]
    if isinstance(ref, str) and not ref.startswith(("http://", "https://", "/")):
        return str((root / ref).resolve())
    return ref
