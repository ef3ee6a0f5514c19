"""Samples over HTTP without loss: prompt text plus raw pixel arrays (npy), never re-encoded images.

The learner decodes media once; a rollout server rebuilds exactly those PIL images and frames, so
its prompt tokens and pixels equal the learner's (JPEG/PNG round trips or mp4 re-encoding would not
guarantee that for video).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from r1_mm.data.prompts import Sample


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


def decode_request(payload: dict[str, Any], mm_kwargs: dict[str, Any] | None = None,
                   present_video: Any = None) -> dict[str, Any]:
    """A vLLM ``generate`` request, identical to what the colocated engine builds in-process
    (``mm_kwargs``: the served model family's processor kwargs, ``vllm_common.processor_kwargs``;
    ``present_video``: how its videos reach a model without a video modality, ``vllm_common.video_presenter``)."""
    from r1_mm.rollout.vllm_common import media_request

    return media_request(payload["prompt"], [Image.fromarray(decode_array(a)) for a in payload.get("images", [])],
                         [(decode_array(v["frames"]), v["metadata"]) for v in payload.get("videos", [])], mm_kwargs,
                         present_video)
