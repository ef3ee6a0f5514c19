"""What a rollout server's ``/generate`` request must be before any of it reaches the engine.

A prompt is text (``"prompt"``) or token ids with every media placeholder unexpanded (``"prompt_token_ids"``: a
tool trajectory's next turn, ``transport.encode_continuation``); either comes with its images and videos.

Why here and not in vLLM: vLLM finds some of these mistakes only while it adds the request (and
then with an error type the server cannot tell from an engine failure), and some never: a media
placeholder without its image is sampled as a plain token and answers 200. Each mistake is the
client's: it gets a 4xx naming the prompt and the problem, and the engine never sees the request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# config fields holding a modality's placeholder token (Qwen-VL: *_token_id, LLaVA-style: *_token_index); a family
# whose prompt text carries another token per medium says so (ModelFamily.prompt_placeholder_fields)
PLACEHOLDER_FIELDS = {"image": ("image_token_id", "image_token_index"),
                      "video": ("video_token_id", "video_token_index")}


def placeholder_fields(hf_config: Any) -> dict[str, tuple[str, ...]]:
    """The config fields holding the prompt text's token per medium for this model's family."""
    from r1_mm.models.families import FAMILIES

    model_type = getattr(hf_config, "model_type", None)
    if model_type in FAMILIES:
        fields = FAMILIES.get(model_type).prompt_placeholder_fields
        if fields is not None:
            return dict(fields)
    return dict(PLACEHOLDER_FIELDS)


class BadRequest(ValueError):
    """The client's mistake: answered with a 4xx naming what was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PromptLimits:
    """What the served model takes: one placeholder token per image / video in the prompt text (the
    model's processor expands each), and prompts within its context length."""

    placeholders: dict[str, int]  # modality -> placeholder token id (a modality without one is not counted)
    max_model_len: int
    tokenize: Callable[[str], list[int]]
    vocab_size: int | None = None  # token ids a token-ids prompt may hold: 0 .. vocab_size - 1 (None: unchecked)

    @classmethod
    def of(cls, llm: Any) -> PromptLimits:
        """From a ``vllm.LLM``: its model's config and tokenizer."""
        config = llm.llm_engine.model_config
        placeholders = {}
        fields_of = placeholder_fields(config.hf_config)
        for modality, fields in fields_of.items():
            token = next((getattr(config.hf_config, f) for f in fields if isinstance(getattr(config.hf_config, f, None), int)),
                         None)
            if token is not None:
                placeholders[modality] = token
        tokenizer = llm.get_tokenizer()
        # vLLM's own bound (renderers/base.py validate_token_ids): the larger of the tokenizer's and the model's
        # vocabularies (a model may have rows its tokenizer does not spell, a tokenizer placeholders the model lacks)
        tokenizer_max = getattr(tokenizer, "max_token_id", len(tokenizer) - 1)
        vocab = max(int(tokenizer_max) + 1, int(config.get_vocab_size()))
        return cls(placeholders, int(config.max_model_len),
                   lambda text: tokenizer.encode(text, add_special_tokens=False), vocab)


def check_media(payload: dict[str, Any], index: int) -> None:
    """Images are (H, W, 3) uint8 arrays, videos (T, H, W, 3) with their timing: anything else is the
    client's error, named, instead of an engine failure."""
    from r1_mm.rollout.transport import decode_array

    def array(text: Any, what: str, ndim: int) -> None:
        try:
            arr = decode_array(text)
        except Exception as exc:
            raise BadRequest(400, f"prompt {index}: {what} is not an npy array ({type(exc).__name__})") from None
        if arr.dtype.name != "uint8" or arr.ndim != ndim or arr.shape[-1] != 3 or 0 in arr.shape:
            raise BadRequest(400, f"prompt {index}: {what} must be a uint8 array of {ndim} dimensions ending in 3 "
                                  f"(RGB), got {arr.dtype.name} {tuple(arr.shape)}")

    if not isinstance(payload, dict):
        raise BadRequest(400, f"prompt {index}: must be an object with 'prompt' (or 'prompt_token_ids'), 'images', "
                              "'videos'")
    if ("prompt" in payload) == ("prompt_token_ids" in payload):
        raise BadRequest(400, f"prompt {index}: needs exactly one of 'prompt' (text) and 'prompt_token_ids'")
    if "prompt" in payload and not isinstance(payload["prompt"], str):
        raise BadRequest(400, f"prompt {index}: 'prompt' must be a string")
    ids = payload.get("prompt_token_ids")
    if "prompt_token_ids" in payload and (not isinstance(ids, list) or not ids
                                          or not all(type(t) is int for t in ids)):
        raise BadRequest(400, f"prompt {index}: 'prompt_token_ids' must be a non-empty list of integers")
    for key in ("images", "videos"):
        if not isinstance(payload.get(key, []), list):
            raise BadRequest(400, f"prompt {index}: '{key}' must be a list")
    for k, image in enumerate(payload.get("images", [])):
        array(image, f"image {k}", 3)
    for k, video in enumerate(payload.get("videos", [])):
        if not isinstance(video, dict) or not isinstance(video.get("metadata"), dict):
            raise BadRequest(400, f"prompt {index}: video {k} needs 'frames' and a 'metadata' mapping")
        array(video.get("frames"), f"video {k} frames", 4)


def check_prompt_text(payload: dict[str, Any], index: int, limits: PromptLimits) -> None:
    """As many placeholders as media, of each kind; not longer than the context before its media are
    even expanded (vLLM checks the expanded length when it adds the request). Token ids must be the
    vocabulary's (vLLM would refuse them only while adding the request)."""
    what = "the text has"
    if "prompt_token_ids" in payload:
        tokens, what = payload["prompt_token_ids"], "the token ids hold"
        bad = next((t for t in tokens if t < 0 or (limits.vocab_size is not None and t >= limits.vocab_size)), None)
        if bad is not None:
            raise BadRequest(400, f"prompt {index}: token id {bad} is outside the vocabulary "
                                  f"(0 .. {limits.vocab_size - 1 if limits.vocab_size is not None else '...'})")
    else:
        tokens = limits.tokenize(payload["prompt"])
    for modality, token in limits.placeholders.items():
        placed, sent = tokens.count(token), len(payload.get(f"{modality}s", []))
        if placed != sent:
            raise BadRequest(400, f"prompt {index}: {what} {placed} {modality} placeholder(s) but {sent} "
                                  f"{modality}(s) were sent; each {modality} needs exactly one")
    if len(tokens) > limits.max_model_len:
        raise BadRequest(400, f"prompt {index}: {len(tokens)} prompt tokens (before its media are expanded), "
                              f"over the server's max_model_len of {limits.max_model_len}")


def check_sampling(kwargs: Any, index: int) -> dict[str, Any]:
    """The SamplingParams arguments for one prompt (logit_bias keys back to ints), built once here so a
    bad field (``n=0``, an unknown name) is the client's error, found before sampling."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError

    if not isinstance(kwargs, dict):
        raise BadRequest(400, f"prompt {index}: sampling must be an object of SamplingParams fields")
    try:
        params = {**kwargs, "logit_bias": {int(k): v for k, v in (kwargs.get("logit_bias") or {}).items()} or None}
        SamplingParams(**params)
    except (VLLMClientError, TypeError, ValueError, AttributeError) as exc:
        raise BadRequest(400, f"prompt {index}: bad sampling parameters: {exc}") from None
    return params


def _prompts_and(body: Any, key: str, shape: str, entries: str) -> tuple[list[Any], list[Any]]:
    """A request's ``prompts`` and its list ``key`` of one entry per prompt, or BadRequest (``shape``: what the
    route needs; ``entries``: what the second list's items are called)."""
    if not isinstance(body, dict) or not isinstance(body.get("prompts"), list) or not isinstance(body.get(key), list):
        raise BadRequest(400, shape)
    prompts, second = body["prompts"], body[key]
    if len(prompts) != len(second):
        raise BadRequest(400, f"{len(prompts)} prompts but {len(second)} {entries}: one per prompt")
    if not prompts:
        raise BadRequest(400, "no prompts")
    return prompts, second


def check_generate(body: Any, limits: PromptLimits) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The prompts and their sampling arguments, or BadRequest naming the first problem."""
    prompts, sampling = _prompts_and(body, "sampling", "generate needs 'prompts' and 'sampling', two lists of the "
                                     "same length", "sampling entries")
    for i, payload in enumerate(prompts):
        check_media(payload, i)
        check_prompt_text(payload, i, limits)
    return prompts, [check_sampling(kwargs, i) for i, kwargs in enumerate(sampling)]


MAX_SCORE_TOP_K = 20  # vLLM's default max_logprobs


def check_score(body: Any, limits: PromptLimits) -> tuple[list[dict[str, Any]], list[list[list[int]]], int]:
    """A ``/score`` request: its prompts (as ``/generate``'s), per prompt the completions (token-id lists) to score
    after it, and ``top_k`` (the teacher's k most likely tokens per position besides the scored one; 0 by default);
    or BadRequest naming the first problem."""
    prompts, completions = _prompts_and(body, "completions", "score needs 'prompts' and 'completions' (per prompt, "
                                        "a list of token-id lists)", "completion lists")
    top_k = body.get("top_k", 0)
    if type(top_k) is not int or not 0 <= top_k <= MAX_SCORE_TOP_K:
        raise BadRequest(400, f"'top_k' must be an integer in [0, {MAX_SCORE_TOP_K}], not {top_k!r}")
    for i, (payload, group) in enumerate(zip(prompts, completions, strict=True)):
        check_media(payload, i)
        check_prompt_text(payload, i, limits)
        if not isinstance(group, list) or not group:
            raise BadRequest(400, f"prompt {i}: 'completions' must hold a non-empty list of token-id lists")
        for k, ids in enumerate(group):
            if not isinstance(ids, list) or not ids or not all(type(t) is int for t in ids):
                raise BadRequest(400, f"prompt {i}: completion {k} must be a non-empty list of integers")
            bad = next((t for t in ids if t < 0 or (limits.vocab_size is not None and t >= limits.vocab_size)), None)
            if bad is not None:
                raise BadRequest(400, f"prompt {i}: completion {k}: token id {bad} is outside the vocabulary")
            for modality, token in limits.placeholders.items():
                if token in ids:
                    raise BadRequest(400, f"prompt {i}: completion {k} holds the {modality} placeholder {token}, "
                                          "which has no media")
    return prompts, completions, top_k
