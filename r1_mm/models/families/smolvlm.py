"""SmolVLM2 (transformers' ``smolvlm``, derived from Idefics3): a SigLIP-style ViT on fixed square tiles, pixel-shuffled
(``scale_factor``) and projected into a Llama decoder; 1-D positions. An image is resized to the processor's
``size``, split into tiles of ``max_image_size`` plus a global tile, each tile written as
``<fake_token_around_image><row_i_col_j>`` + ``<image>`` x ``image_seq_len``; a video is one global tile per
frame after a "Frame from MM:SS:" line.

Why its own media tokens: SmolVLMProcessor writes the fake/global/row-col markers as text, so the tokenizer
carries them as single tokens (as the released ones do) and names them the way the processor reads them.

Why no processor kwargs for vLLM: vLLM's Idefics3 processor counts an image's tiles as if it had been resized
to ``size`` (``get_number_of_image_patches`` ignores ``do_resize``), so the learner's processor must resize
too (r1-mm's ``do_resize=False`` is for patch-aligned Qwen-style processors only) and vLLM must run the
same processor with its saved settings.

Why video reaches vLLM as images: vLLM's model takes images only (no video modality), but SmolVLM2 writes a video
as one global tile per frame after a "Frame from MM:SS:" line, which is exactly what an image the image processor does
not split becomes. So for vLLM (``vllm_video_as_images``) the prompt's ``<video>`` is replaced by transformers' own
video text (its intro, one timestamp line per frame, its outro) with one ``<image>`` per frame, the frames go as
images, and the request's processor kwargs (``frame_kwargs``) turn image splitting off and hand the image processor
the video processor's size, resampling and normalisation: it then resizes each frame as the video processor does
(longest edge to the video ``size``, then square to ``max_image_size``). Splitting off alone is not enough when
the two sizes differ, as in SmolVLM2's released configs (``video_sampling.video_size`` is the tile, ``size`` 4
tiles' side) and in the tiny model, built the same way: 0.63 apart after normalisation, 5.5e-3 nats on a noise
video (measured). vLLM's prompt tokens and logprobs then equal the learner's (both vLLM engines, across weight
syncs, max 1.9e-6). One prompt's images share one setting, so a row with both images and a video is refused on the
vLLM engines (the hf engine takes it).

Idefics3 (``families/idefics3.py``) is the same model and image processing without video; the tiny model's
tiles, tokens, vision sizes and chat turns below are shared with it.
"""

from __future__ import annotations

from typing import Any

from r1_mm.models.families.base import TESTED, ModelFamily, VideoForVLLM
from r1_mm.models.families.tiny_parts import TURNS_HEAD, TURNS_TAIL, text_sizes

TILE = 32  # the ViT's input side (max_image_size): 4x4 patches of 8 px, pixel-shuffled by 2 to 4 tokens
PATCH = 8
SCALE = 2
MAX_SIDE = 2 * TILE  # images resized to this longest edge: at most 2x2 tiles + the global one
GRID = 2
# The names SmolVLMProcessor reads from its tokenizer, and the tokens they stand for.
NAMED_TOKENS = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                "global_image_token": "<global-img>", "video_token": "<video>",
                "end_of_utterance_token": "<end_of_utterance>"}
ROW_COL_TOKENS = tuple(f"<row_{r}_col_{c}>" for r in range(1, GRID + 1) for c in range(1, GRID + 1))
MEDIA_TOKENS = tuple(NAMED_TOKENS.values()) + ROW_COL_TOKENS


def chat_template(video: bool) -> str:
    """The same turns as Qwen; media as the SmolVLM / Idefics3 hub templates render them ("<image>", and
    "<video>" for a family that takes video)."""
    return TURNS_HEAD + (
        "{%- if part['type'] == 'image' -%}{{ '<image>' }}"
        + ("{%- elif part['type'] == 'video' -%}{{ '<video>' }}" if video else "")
        + "{%- elif 'text' in part -%}{{ part['text'] }}"
    ) + TURNS_TAIL


CHAT_TEMPLATE = chat_template(video=True)


def image_seq_len() -> int:
    return (TILE // PATCH) ** 2 // SCALE ** 2


def tiny_config(config_class: type, spec: Any, tokenizer: Any) -> Any:
    """The tiny model's config (Llama decoder, ViT on TILE-px tiles, pixel shuffle by SCALE) of SmolVLM or
    Idefics3: the two configs take the same fields."""
    text = text_sizes(spec, tokenizer) | {"model_type": "llama"}
    vision = {"hidden_size": spec.vision_hidden_size, "intermediate_size": spec.vision_hidden_size * 2,
              "num_hidden_layers": spec.vision_depth, "num_attention_heads": spec.vision_heads,
              "image_size": TILE, "patch_size": PATCH}
    return config_class(text_config=text, vision_config=vision, scale_factor=SCALE,
                        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                        pad_token_id=text["pad_token_id"], tie_word_embeddings=False)


# images resized to MAX_SIDE, then split into TILE-px tiles (+ the global one); the image processors of both
# families take these
PROCESSOR_SIZES = {"size": {"longest_edge": MAX_SIDE}, "max_image_size": {"longest_edge": TILE}}


def build_tiny(spec: Any, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    tokenizer._set_model_specific_special_tokens(special_tokens=dict(NAMED_TOKENS))
    config = tiny_config(SmolVLMConfig, spec, tokenizer)
    image = SmolVLMImageProcessor(**PROCESSOR_SIZES, do_image_splitting=True)
    # frames arrive already decoded at r1-mm's fps: never re-sampled, each one global tile; resized to the tile
    # first, not to the image size, as the released SmolVLM2 processors do (video_sampling.video_size is the tile)
    tile = PROCESSOR_SIZES["max_image_size"]
    video = SmolVLMVideoProcessor(size=tile, max_image_size=tile, do_sample_frames=False)
    processor = SmolVLMProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                 image_seq_len=image_seq_len(), chat_template=CHAT_TEMPLATE)
    return config, processor


# what the image processor is told per request so that it treats a frame as the video processor does: the video
# processor's own resize (its size may be another than the image processor's: SmolVLM2's video_size is its tile),
# resampling and normalisation; vLLM's Idefics3 model normalises on the host, with these kwargs
FRAME_FIELDS = ("size", "max_image_size", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize",
                "image_mean", "image_std", "do_convert_rgb")


def frame_kwargs(video_processor: Any) -> dict[str, Any]:
    """The image processor kwargs that process a video frame as ``video_processor`` does, unsplit (plain values:
    vLLM hashes them with the media for its caches)."""
    kwargs: dict[str, Any] = {"do_image_splitting": False}
    for name in FRAME_FIELDS:
        value = getattr(video_processor, name)
        if name == "size" and not isinstance(value, dict):  # transformers keeps it as a SizeDict
            value = {k: getattr(value, k) for k in ("longest_edge", "height", "width") if getattr(value, k) is not None}
        elif name == "resample":
            value = int(value)
        elif isinstance(value, (tuple, list)):
            value = [float(v) for v in value]
        kwargs[name] = value
    return kwargs


def vllm_video_as_images(prompt: str, videos: list[tuple[Any, dict[str, Any]]], processor: Any) -> VideoForVLLM:
    """The request vLLM's image-only SmolVLM model gets for a prompt with videos (see the module's doc).

    Each ``<video>`` becomes the text transformers' SmolVLMProcessor writes for it (``replace_video_token``: the
    frame count, the duration, one "Frame from MM:SS:" line per frame), with each frame's tile string shrunk to the
    one ``<image>`` vLLM expands back into that string (``<fake_token_around_image><global-img>`` + ``<image>`` x
    image_seq_len + ``<fake_token_around_image>``, the unsplit image's replacement). The frames go as images, with
    :func:`frame_kwargs` of the processor's video processor."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image
    from transformers import SmolVLMProcessor
    from transformers.video_utils import VideoMetadata

    pieces = prompt.split(processor.video_token)
    if len(pieces) - 1 != len(videos):
        raise ValueError(f"the prompt has {len(pieces) - 1} {processor.video_token} placeholder(s) but {len(videos)} "
                         "video(s) came")
    # the processor's own template, with every frame's tile string written as the one placeholder vLLM expands
    frame_as_placeholder = SimpleNamespace(image_seq_len=1, image_token=processor.image_token, fake_image_token="",
                                           global_image_token="")
    text, frames = pieces[0], []
    for (video, metadata), after in zip(videos, pieces[1:], strict=True):
        shape = np.empty((1, len(video)))  # replace_video_token reads the frame count from pixel_values.shape[1]
        text += SmolVLMProcessor.replace_video_token(
            frame_as_placeholder, {"pixel_values": shape, "video_metadata": [VideoMetadata(**metadata)]}, 0) + after
        frames += [Image.fromarray(np.asarray(frame)) for frame in video]
    return VideoForVLLM(prompt=text, images=frames, processor_kwargs=frame_kwargs(processor.video_processor))


FAMILY = ModelFamily(
    model_type="smolvlm", display_name="SmolVLM2", build_tiny=build_tiny, chat_template=CHAT_TEMPLATE,
    media_tokens=MEDIA_TOKENS,
    vllm_processor_kwargs={},  # see the module's doc: vLLM runs the saved processor as the learner does
    vllm_video_as_images=vllm_video_as_images,
    note="Idefics3 (idefics3) is its own family (families/idefics3.py: the same model, images only). Video rows "
         "render with transformers' SmolVLM video template (SmolVLMProcessor swaps it in for any conversation with a "
         "video), not the family's chat_template. On the vLLM engines a video's frames are sent as unsplit images "
         "(vLLM's model has no video modality): they count against the image limit (rollout.engine=vllm_colocate "
         "and the servers vllm_pool starts raise it to vllm_max_videos_per_prompt x the recipe's most frames; "
         "servers started by hand need --max-images that high), and a row with both images and a video is refused "
         "there.",
    support={
        "grouped": TESTED, "hf": TESTED, "vllm_colocate": TESTED, "vllm_pool": TESTED, "weight_sync": TESTED,
        "lora": TESTED, "video": TESTED,
    })
