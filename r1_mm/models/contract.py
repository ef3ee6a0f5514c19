"""The sampler/learner contract of a model, checked on a few synthetic rows: the cheap, engine-free part.

Why: mismatches between the processor, the learner's forward and the rollout engine are silent (a run
trains on wrong numbers with exit 0). Two of the checks need no engine and take seconds on a loaded
model, so ``r1-mm check-model`` runs them and a training run can call :func:`cheap_contract` before
step 1:

- placeholders: the processor's image/video placeholder tokens in ``input_ids`` must be as many as the
  feature rows the model's vision path produces for those media (otherwise transformers either raises
  or, worse, scatters features into the wrong tokens);
- grouped vs naive: the grouped forward (prompt once, completions packed behind it) must give the naive
  forward's per-token logprobs at :data:`GROUPED_TOLERANCE` in float32.

Everything here goes through transformers' generic VLM API (``get_image_features`` /
``get_video_features``) and the family table, never per-family branches, so a model whose family is not
registered is still checked: that is how a user sees what breaks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from r1_mm.config.recipe import DataConfig, MediaConfig
from r1_mm.data.prompts import PromptBuilder, Sample

GROUPED_TOLERANCE = 1e-5  # max |grouped - naive| per token, float32 (the grouped forward's own tests)
ROW_KINDS = ("image", "two_images", "video")
IMAGE_SIDE = 56  # 2x2 Qwen-VL tokens after merging; one SigLIP tile of the tiny LLaVA-OneVision
VIDEO_FRAMES = 4
COMPLETION_LENGTHS = (5, 2, 7)  # G = 3 completions per prompt, of different lengths (right padding exercised)


@dataclass
class CheckLine:
    """One line of the contract table: one check on one row kind.

    ``passed`` is None when the check does not apply (skipped, with the reason in ``note``)."""

    check: str
    kind: str
    measured: str
    tolerance: str
    passed: bool | None
    note: str = ""

    @property
    def status(self) -> str:
        return "skip" if self.passed is None else ("ok" if self.passed else "FAIL")


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = (int(v) for v in rng.integers(0, IMAGE_SIDE - 12, 2))
        draw.rectangle([x, y, x + 11, y + 11], fill=tuple(int(c) for c in rng.integers(40, 255, 3)))
    return img


def _video(seed: int) -> np.ndarray:
    """(T, H, W, 3) uint8: a square moving across black frames."""
    frames = np.zeros((VIDEO_FRAMES, IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    colour = np.random.default_rng(seed).integers(40, 255, 3)
    for t in range(VIDEO_FRAMES):
        x = 4 + t * 10
        frames[t, 20:32, x:x + 12] = colour
    return frames


def synthetic_rows(seed: int = 0) -> dict[str, dict[str, Any]]:
    """One row per kind (a single image, two images, a short video), media in memory (no files)."""
    return {
        "image": {"id": "check-image", "image": _image(seed), "prompt": "How many squares are in the image?"},
        "two_images": {"id": "check-two-images", "images": [_image(seed + 1), _image(seed + 2)],
                       "prompt": "Which image has more squares?"},
        "video": {"id": "check-video", "video": _video(seed + 3), "video_fps": 2.0,
                  "prompt": "When does the square reach the right edge?"},
    }


@dataclass
class SyntheticRows:
    """The synthetic rows as Samples, and the row kinds that could not be built with why: ``missing`` maps
    a kind to (passed, note), None = skipped (the family refuses video), False = the processor failed."""

    samples: dict[str, Sample]
    missing: dict[str, tuple[bool | None, str]]

    def missing_lines(self, check: str, tolerance: str) -> list[CheckLine]:
        return [CheckLine(check, kind, "-" if passed is None else "error", tolerance, passed, note)
                for kind, (passed, note) in self.missing.items()]


def synthetic_samples(processor: Any, family: Any = None, seed: int = 0) -> SyntheticRows:
    """The synthetic rows through the same prompt builder (media budgets, chat template, processor) as
    training data. A family that refuses video gets no video row (skipped with its line); a row the
    processor cannot encode is a failure of that row kind, not of the whole check."""
    builder = PromptBuilder(processor, DataConfig(format_instruction=None, max_prompt_length=4096), MediaConfig(), None)
    rows = SyntheticRows({}, {})
    for i, (kind, row) in enumerate(synthetic_rows(seed).items()):
        refusal = family.refusal("video") if family is not None and kind == "video" else None
        if refusal:
            rows.missing[kind] = (None, refusal)
            continue
        try:
            rows.samples[kind] = builder.prepare(row, i)
        except Exception as exc:  # noqa: BLE001 - an unverified model's failure is the finding
            rows.missing[kind] = (False, f"the processor could not encode this row: {one_line(exc)}")
    return rows


def in_table_order(lines: list[CheckLine]) -> list[CheckLine]:
    """Lines grouped by check (in the order they first appear), each in ROW_KINDS order."""
    checks = list(dict.fromkeys(x.check for x in lines))
    kinds = {k: i for i, k in enumerate(ROW_KINDS)}
    return sorted(lines, key=lambda x: (checks.index(x.check), kinds.get(x.kind, len(kinds))))


# -- (a) placeholders vs vision features -------------------------------------------------------------------

def _token_id(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= 0:
            return value
    return None


def _media_ids(config: Any) -> list[int]:
    """Ids of the media placeholder and delimiter tokens the config names (random completions avoid them)."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
             "image_token_index", "video_token_index")
    return [i for i in (_token_id(config, n) for n in names) if i is not None]


def _feature_rows(output: Any) -> int:
    """Feature rows (tokens) in what ``get_*_features`` returns, whatever its shape: a model output whose
    pooler_output is a tensor or a tuple of per-media tensors, a tuple, or a tensor; rows = numel / hidden."""
    if hasattr(output, "pooler_output") and output.pooler_output is not None:
        output = output.pooler_output
    elif hasattr(output, "last_hidden_state") and not isinstance(output, torch.Tensor):
        output = output.last_hidden_state
    if isinstance(output, torch.Tensor):
        return output.numel() // output.shape[-1]
    return sum(_feature_rows(part) for part in output)


def _call_features(fn: Callable[..., Any], inputs: dict[str, Any], pixels_key: str) -> Any:
    """``fn`` with the processor outputs it names; its first (pixel) argument gets ``pixels_key``."""
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in inputs.items() if k in params}
    first = next(iter(params))
    kwargs[first] = inputs[pixels_key]
    return fn(**kwargs)


def _placeholders(config: Any, ids: torch.Tensor, modality: str, token_names: tuple[str, ...]) -> int:
    """Placeholder tokens of one modality in ``ids``. GLM-4.1V writes no video token: each frame's features
    sit on image tokens between the video's start and end tokens (its processor and model both place them
    so); those are the video's placeholders when the config names such delimiters."""
    token = _token_id(config, *token_names)
    count = int((ids == token).sum()) if token is not None else 0
    delimiters = [_token_id(config, n) for n in ("video_start_token_id", "video_end_token_id", "image_token_id")]
    if modality != "video" or count or None in delimiters:
        return count
    start, end, image = delimiters
    inside = (ids == start).cumsum(-1) > (ids == end).cumsum(-1)
    return int(((ids == image) & inside).sum())


def placeholder_counts(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """modality -> (placeholder tokens in input_ids, feature rows the vision path produces), for each
    modality the inputs carry."""
    config = model.config
    ids = inputs["input_ids"]
    found = {}
    media = (("image", "pixel_values", "get_image_features", ("image_token_id", "image_token_index")),
             ("video", "pixel_values_videos", "get_video_features", ("video_token_id", "video_token_index")))
    for modality, key, method, token_names in media:
        if inputs.get(key) is None:
            continue
        placeholders = _placeholders(config, ids, modality, token_names)
        fn = getattr(model, method, None) or getattr(getattr(model, "model", None), method, None)
        if fn is None:
            raise AttributeError(f"{type(model).__name__} has no {method}")
        with torch.no_grad():
            rows = _feature_rows(_call_features(fn, inputs, key))
        found[modality] = (placeholders, rows)
    return found


def check_placeholders(model: torch.nn.Module, samples: dict[str, Sample]) -> list[CheckLine]:
    lines = []
    for kind, sample in samples.items():
        try:
            counts = placeholder_counts(model, dict(sample.inputs))
        except Exception as exc:  # noqa: BLE001 - an unverified model's failure is the finding
            lines.append(CheckLine("placeholders", kind, "error", "equal", False, one_line(exc)))
            continue
        if not counts:
            lines.append(CheckLine("placeholders", kind, "no media in the processor output", "equal", False))
            continue
        measured = ", ".join(f"{m} {p} tokens / {r} features" for m, (p, r) in counts.items())
        lines.append(CheckLine("placeholders", kind, measured, "equal", all(p == r for p, r in counts.values())))
    return lines


# -- (b) grouped vs naive ---------------------------------------------------------------------------------

def random_completions(tokenizer: Any, excluded: list[int], n_prompts: int, seed: int = 0) -> list[list[int]]:
    """G = len(COMPLETION_LENGTHS) completions per prompt of ordinary tokens (no special or media token)."""
    banned = set(tokenizer.all_special_ids) | set(excluded)
    vocab = [i for i in range(len(tokenizer)) if i not in banned]
    gen = torch.Generator().manual_seed(seed)
    return [[vocab[int(j)] for j in torch.randint(0, len(vocab), (n,), generator=gen)]
            for _ in range(n_prompts) for n in COMPLETION_LENGTHS]


def grouped_gap(model: torch.nn.Module, samples: list[Sample], completions: list[list[int]], pad_id: int) -> float:
    """max |grouped - naive| over the completions' tokens (float32, temperature 1)."""
    from r1_mm.models.forward.scoring import score_completions

    g = len(completions) // len(samples)
    with torch.no_grad():
        grouped, _, mask = score_completions(model, samples, completions, g, pad_id, temperature=1.0, mode="grouped")
        naive, _, naive_mask = score_completions(model, samples, completions, g, pad_id, temperature=1.0, mode="naive")
    if not torch.equal(mask.bool(), naive_mask.bool()):
        raise AssertionError("grouped and naive completion masks differ")
    return float((grouped - naive)[mask.bool()].abs().max())


def check_grouped(model: torch.nn.Module, processor: Any, samples: dict[str, Sample], family: Any,
                  *, seed: int = 0) -> list[CheckLine]:
    """Grouped vs naive per row kind; skipped with the family's refusal when it does not support grouped
    (a model outside the registered families is tried: its failure is what the user needs to see)."""
    tolerance = f"<= {GROUPED_TOLERANCE:g}"
    refusal = family.refusal("grouped") if family is not None else None
    if refusal:
        return [CheckLine("grouped_vs_naive", kind, "-", tolerance, None, refusal) for kind in samples]
    tokenizer = getattr(processor, "tokenizer", processor)
    media = _media_ids(model.config)
    lines = []
    for i, (kind, sample) in enumerate(samples.items()):
        completions = random_completions(tokenizer, media, 1, seed=seed + i)
        try:
            gap = grouped_gap(model, [sample], completions, tokenizer.pad_token_id)
        except Exception as exc:  # noqa: BLE001 - an unverified model's failure is the finding
            lines.append(CheckLine("grouped_vs_naive", kind, "error", tolerance, False, one_line(exc)))
            continue
        lines.append(CheckLine("grouped_vs_naive", kind, f"{gap:.2e}", tolerance, gap <= GROUPED_TOLERANCE))
    return lines


def cheap_contract(model: torch.nn.Module, processor: Any, *, family: Any = None, seed: int = 0,
                   grouped: bool = True) -> list[CheckLine]:
    """Checks (a) placeholders vs features and (b) grouped vs naive on the synthetic rows, in seconds and
    without an engine: what a training run can call before step 1. The model is scored in float32 (a copy
    is made when it is not). ``family``: the registered ModelFamily, or None for an unverified model.
    ``grouped=False``: (b) is not run (a run on the naive forward does not depend on it)."""
    if next(model.parameters()).dtype != torch.float32:
        import copy

        model = copy.deepcopy(model).float()
    was_training = model.training
    model.eval()
    try:
        rows = synthetic_samples(processor, family, seed)
        lines = check_placeholders(model, rows.samples) + rows.missing_lines("placeholders", "equal")
        if grouped:
            lines += check_grouped(model, processor, rows.samples, family, seed=seed)
            lines += rows.missing_lines("grouped_vs_naive", f"<= {GROUPED_TOLERANCE:g}")
        return in_table_order(lines)
    finally:
        model.train(was_training)


def contract_refusal(lines: list[CheckLine]) -> str | None:
    """The one line a run stops with when :func:`cheap_contract` found a mismatch, or None when it passed."""
    failed = [x for x in lines if x.passed is False]
    if not failed:
        return None
    what = "; ".join(f"{x.check} on {x.kind}: {x.measured}" + (f" ({x.note})" if x.note else "") + f", tolerance {x.tolerance}"
                     for x in failed)
    return f"the model fails r1-mm's sampler/learner contract ({len(failed)} of {len(lines)} checks): {what}"


def unverified_model_refusal(model: torch.nn.Module, processor: Any, *, grouped: bool) -> str | None:
    """For a model whose family r1-mm has not verified, before step 1: the one line the run stops with when
    the cheap contract fails, or None. The grouped forward is checked only when the run uses it."""
    line = contract_refusal(cheap_contract(model, processor, grouped=grouped))
    return None if line is None else f"model_type '{model.config.model_type}' is not a family r1-mm has verified, and {line}"


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
