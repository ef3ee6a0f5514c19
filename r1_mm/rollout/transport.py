"""Samples over HTTP without loss: prompt text plus raw pixel arrays (npy), never re-encoded images.

The learner decodes media once; a rollout server rebuilds exactly those PIL images and frames, so
its prompt tokens and pixels equal the learner's (JPEG/PNG round trips or mp4 re-encoding would not
guarantee that for video). A tool trajectory's next turn goes as token ids instead of text
(:func:`encode_continuation`), with every media placeholder unexpanded, as ``vllm_colocate`` sends it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from r1_mm.data.prompts import Sample

if TYPE_CHECKING:
    from r1_mm.data.turns import ToolContext


def encode_array(array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def decode_array(text: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def encode_sample(sample: Sample) -> dict[str, Any]:
    return {"prompt": sample.prompt_text, "row_id": sample.row_id,
            "images": [encode_array(np.asarray(im.convert("RGB"))) for im in sample.images],
            "videos": [{"frames": encode_array(v.frames), "metadata": v.metadata()} for v in sample.videos]}


def encode_continuation(sample: Sample, context: ToolContext, tokenizer: Any) -> dict[str, Any]:
    """A trajectory's next turn as a server prompt: the token ids of ``vllm_common.continuation_request`` (the
    prompt's text tokens, then the trajectory's with its tool images' placeholders unexpanded) and the media in order
    of appearance (the prompt's images, then the tool images; the prompt's videos)."""
    from r1_mm.rollout.vllm_common import continuation_ids

    ids = continuation_ids(sample, context, tokenizer)
    return {"prompt_token_ids": ids, "row_id": sample.row_id,
            "images": [encode_array(np.asarray(im.convert("RGB"))) for im in [*sample.images, *context.images]],
            "videos": [{"frames": encode_array(v.frames), "metadata": v.metadata()} for v in sample.videos]}


def decode_request(payload: dict[str, Any], mm_kwargs: dict[str, Any] | None = None,
                   present_video: Any = None) -> dict[str, Any]:
    """A vLLM ``generate`` request, identical to what the colocated engine builds in-process
    (``mm_kwargs``: the served model family's processor kwargs, ``vllm_common.processor_kwargs``;
    ``present_video``: how its videos reach a model without a video modality, ``vllm_common.video_presenter``)."""
    from r1_mm.rollout.vllm_common import media_request

    prompt = payload["prompt"] if "prompt" in payload else list(payload["prompt_token_ids"])
    return media_request(prompt, [Image.fromarray(decode_array(a)) for a in payload.get("images", [])],
                         [(decode_array(v["frames"]), v["metadata"]) for v in payload.get("videos", [])], mm_kwargs,
                         present_video)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What makes two tokenizers give every token the same id, as one short string: a hash of the vocabulary
    (token -> id, added tokens included) and the EOS / BOS ids. A served teacher reports it in its ``/health``, and
    a distillation run compares it with the student's (the pad token is left out: scoring never reads it)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    text = json.dumps([sorted(tok.get_vocab().items()), getattr(tok, "eos_token_id", None),
                       getattr(tok, "bos_token_id", None)], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
