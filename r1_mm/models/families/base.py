"""What r1-mm knows about one model family: how to build its tiny model, what it has been tested to do,
and what it must refuse.

Why a declared table and not checks spread through the code: an architecture the grouped forward, an
engine or the weight sync does not handle exactly must be refused before step 1 in one line, never
trained with wrong numbers. Each family module states, per capability, either that it is tested
(the test that shows it) or why it is refused; the load checks, ``r1-mm families`` and the README's
table all read this one statement.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Capabilities a family is tested for or refused, in the order the README's table shows them.
CAPABILITIES = ("grouped", "hf", "vllm_colocate", "vllm_pool", "weight_sync", "video", "lora")
CAPABILITY_HELP = {
    "grouped": "training.forward_mode=grouped (packed completions) equals the naive forward",
    "hf": "rollout.engine=hf samples it",
    "vllm_colocate": "rollout.engine=vllm_colocate samples it",
    "vllm_pool": "rollout.engine=vllm_pool samples it",
    "weight_sync": "weights synced to vLLM give the learner's logprobs",
    "video": "video rows",
    "lora": "model.lora adapters",
    "tools": "tools.functions (multi-turn tool rollouts)",
}
TESTED = "tested"
UNVERIFIED_TOOLS = ("no test has run a tool trajectory of this family (tool turns tokenised alone equal to the whole "
                    "conversation, learner == engine logprobs: tests/test_tool_turns.py)")
# what vLLM's processor is told unless a family says otherwise: media.py already sized the pixels within the
# recipe's budget, so vLLM must not resize them again
DEFAULT_VLLM_PROCESSOR_KWARGS: Mapping[str, Any] = {"do_resize": False}


def required_text_flag(name: str, transformers_does: str, vllm_does: str) -> Callable[[Any], str | None]:
    """A ``ModelFamily.check_config`` for a boolean of the text config that transformers' config class no longer
    declares (the released config.json files carry it) and vLLM reads: without it true, vLLM computes something
    other than what transformers always computes."""

    def check(config: Any) -> str | None:
        if getattr(config.get_text_config(), name, None) is not True:
            return (f"text_config.{name} must be true (transformers always {transformers_does}; vLLM {vllm_does} "
                    f"only when this is set): add \"{name}\": true to text_config in config.json")
        return None

    return check


@dataclass(frozen=True)
class VideoForVLLM:
    """A prompt's videos as a family presents them to a vLLM model without a video modality: the prompt text
    with each video placeholder written out, the frames as images (in prompt order), and the processor kwargs
    the request needs on top of the family's ``vllm_processor_kwargs``."""

    prompt: str
    images: list[Any]
    processor_kwargs: Mapping[str, Any]


class UnsupportedModelError(ValueError):
    """A model (or a use of it) r1-mm has not verified; the message is the one line a run stops with."""


@dataclass(frozen=True)
class ModelFamily:
    """One family, named by transformers' ``model_type``.

    ``support`` maps each of :data:`CAPABILITIES` to ``"tested"`` or to the reason it is refused.
    ``build_tiny(spec, tokenizer)`` returns (config, processor) of a tiny random-weight model;
    ``chat_template`` and ``media_tokens`` shape its tiny tokenizer. ``vllm_processor_kwargs`` are
    what vLLM's processor for this family needs so that it neither resizes nor re-samples the media
    r1-mm already decoded.
    """

    model_type: str
    display_name: str
    build_tiny: Callable[[Any, Any], tuple[Any, Any]]
    chat_template: str
    support: Mapping[str, str]
    media_tokens: tuple[str, ...] = ()
    vllm_processor_kwargs: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_VLLM_PROCESSOR_KWARGS))
    # what r1-mm changes on a loaded model of this family so the learner computes what the checkpoint was
    # trained with and what vLLM computes (e.g. rope_index.install); applied by models.loading.prepare_model
    prepare: Callable[[Any], None] | None = None
    # a problem of one checkpoint's config that would make the engines and the learner compute different
    # things (one line), or None; run at load with the family checks (run/preflight.family_problems)
    check_config: Callable[[Any], str | None] | None = None
    # tools.functions (multi-turn tool rollouts): "tested" where tests/test_tool_turns.py shows a trajectory built
    # turn by turn scores as the processor's whole conversation and the engine samples it as the learner scores it
    tools: str = UNVERIFIED_TOOLS
    # how a prompt's videos reach a vLLM model of this family that has no video modality (SmolVLM: the frames as
    # unsplit images): ``(prompt, [(frames, metadata)], processor) -> VideoForVLLM``; None: vLLM takes videos.
    # Such a family's vLLM engines refuse rows with both images and videos (one prompt's images share one setting)
    vllm_video_as_images: Callable[[str, list[tuple[Any, dict[str, Any]]], Any], VideoForVLLM] | None = None
    # config fields holding the token the prompt TEXT carries per image / video, where it is not the one the
    # processor expands (Gemma 3: <start_of_image>, boi_token_index); None: the usual *_token_id / *_token_index
    # (the rollout server counts these against the request's media, rollout/request_checks.py)
    prompt_placeholder_fields: Mapping[str, tuple[str, ...]] | None = None
    # model.lora_vision: the vision tower's and projector's linear layers that get LoRA adapters, as name suffixes
    # inside the modules models.loading.vision_modules finds (e.g. "attn.qkv", "merger.mlp.0"); empty: refused
    lora_vision_targets: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        missing = [c for c in CAPABILITIES if c not in self.support]
        extra = [c for c in self.support if c not in CAPABILITIES]
        if missing or extra:
            raise ValueError(f"model family {self.model_type}: support must state every capability "
                             f"(missing {missing}, unknown {extra})")

    def supports(self, capability: str) -> bool:
        return (self.tools if capability == "tools" else self.support[capability]) == TESTED

    def refusal(self, capability: str) -> str | None:
        """The one line a run using ``capability`` stops with, or None when it is tested."""
        if self.supports(capability):
            return None
        reason = self.tools if capability == "tools" else self.support[capability]
        return f"{self.display_name} ({self.model_type}): {CAPABILITY_HELP[capability]} is not verified: {reason}"
