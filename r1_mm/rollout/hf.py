"""The ``hf`` rollout engine: transformers ``generate`` on the learner's own model (CPU default).

It needs no weight transfer (it samples from the live policy), which makes it the reference every
other engine is compared with. Asynchronous rollouts (``rollout.max_staleness``) therefore interleave it
with the learner instead of running it beside the update: it samples the next steps' batches between two
updates, when the live model is a known version (no snapshot copy of the weights; see
``r1_mm.trainers.async_rollouts``). The G samples of one prompt share one prefill: the vision tower and the
prompt run once, and the resulting KV cache is repeated G times before decoding (``num_return_sequences``
would instead repeat the pixels and prefill G times, which dominates a long video prompt).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from r1_mm.data.prompts import Sample
from r1_mm.data.turns import ToolContext
from r1_mm.rollout.base import (
    Completion,
    PromptCompletions,
    RolloutEngine,
    SamplingSettings,
    eos_ids,
    media_token_ids,
)


def _shared_prefill(model: torch.nn.Module, inputs: Any, n: int) -> Any:
    """Prefill all prompt tokens but the last once and return that KV cache repeated ``n`` times.

    ``generate`` then only feeds the last prompt token for each of the n rows and decodes from there.
    The last token is text (the chat template's assistant header), so the media inputs are consumed
    here and never again. Qwen-VL models keep the M-RoPE offset of this prefill in
    ``model.model.rope_deltas``, which ``generate`` uses for the continued positions.
    """
    head = {k: (v[:, :-1] if k in _PER_TOKEN_KEYS else v) for k, v in inputs.items()}
    out = model(**head, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    repeat_cache_rows(cache, n)
    return cache


def repeat_cache_rows(cache: Any, n: int) -> None:
    """Repeat every row of the prefill's cache ``n`` times, linear-attention states included.

    Why not ``cache.batch_repeat_interleave``: transformers' linear-attention cache layers (Qwen3.5's Gated
    DeltaNet: a convolution state and a recurrent state per layer) do not implement it, so a hybrid model's
    cache fails there; their states are repeated here, and attention layers by their own method."""
    from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin

    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for states, ready in ((layer.conv_states, layer.is_conv_states_initialized),
                                  (layer.recurrent_states, layer.is_recurrent_states_initialized)):
                for i in states:
                    if ready[i]:
                        states[i] = states[i].repeat_interleave(n, dim=0)
            if isinstance(layer, DynamicLayer):  # a layer holding both kinds (LinearAttentionAndFullAttentionLayer)
                DynamicLayer.batch_repeat_interleave(layer, n)
        else:
            layer.batch_repeat_interleave(n)


_PER_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


class SampledLogprobs(LogitsProcessor):
    """log p(sampled token) under the distribution ``generate`` samples from, one (rows x vocabulary)
    step at a time.

    Why not ``output_scores``: it keeps every step's (rows x vocabulary) scores, 2.5 GB for 8 x 512
    tokens at Qwen2.5-VL's vocabulary (and as much again for their log-softmax). Custom processors run
    after transformers' own (token suppression, repetition penalty) and before its sampling warpers,
    so this one applies transformers' own temperature / top-k / top-p warpers to a copy, keeps that
    step's log-softmax, and reads the sampled token's entry at the next step (from ``input_ids``).
    """

    def __init__(self, sampling: SamplingSettings):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.warpers = LogitsProcessorList()
        if not sampling.greedy:
            if sampling.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k:
                self.warpers.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(sampling.top_p))
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = torch.log_softmax(self.warpers(input_ids, scores.float().clone()), dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """(rows, steps) logprobs, given the tokens sampled at the last step."""
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, last_tokens[:, None]).squeeze(-1))
            self.previous = None
        return torch.stack(self.steps, dim=1)


class HFRolloutEngine(RolloutEngine):
    name = "hf"
    samples_from_policy = True  # the learner lends its (gathered) model for each generate call

    def __init__(self, model: torch.nn.Module, processor: Any, **_: Any):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # processors run after the sampled-logprob recorder (it reads the model's own distribution first); empty
        # in training. Tests put a scripted policy here: it picks the tokens, the recorder still reports their
        # logprobs under the model, so learner and sampler can be compared on a trajectory that calls tools.
        self.after_recorder: list[LogitsProcessor] = []

    def update_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # same process, same tensors: nothing to copy

    def _generate_kwargs(self, sampling: SamplingSettings, max_tokens: int) -> dict[str, Any]:
        model = self.model
        kwargs: dict[str, Any] = dict(max_new_tokens=max_tokens, return_dict_in_generate=True,
                                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self.eos),
                                      use_cache=True, suppress_tokens=media_token_ids(model.config) or None)
        if sampling.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k if sampling.top_k is not None else 0,
                          repetition_penalty=sampling.repetition_penalty)
        return kwargs

    @property
    def eos(self) -> set[int]:
        return eos_ids(self.model, self.tokenizer)

    def _completion(self, ids: list[int], logprobs: torch.Tensor) -> Completion:
        """A sampled row cut after its first end-of-sequence token."""
        eos = self.eos
        end = next((i for i, t in enumerate(ids) if t in eos), None)
        kept = ids if end is None else ids[: end + 1]
        return Completion(text=self.tokenizer.decode(kept, skip_special_tokens=True), token_ids=kept,
                          logprobs=logprobs[: len(kept)].tolist(), truncated=end is None)

    @torch.no_grad()
    def generate(self, batch: list[Sample], n: int, sampling: SamplingSettings) -> list[PromptCompletions]:
        model = self.model
        was_training = model.training
        model.eval()
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        kwargs = self._generate_kwargs(sampling, sampling.max_tokens)
        results = []
        try:
            for sample in batch:
                inputs = sample.inputs.to(next(model.parameters()).device)
                ids, mask = inputs["input_ids"], inputs["attention_mask"]
                cache = _shared_prefill(model, inputs, n)
                recorder = SampledLogprobs(sampling)
                out = model.generate(input_ids=ids.repeat(n, 1), attention_mask=mask.repeat(n, 1),
                                     past_key_values=cache,
                                     logits_processor=LogitsProcessorList([recorder, *self.after_recorder]), **kwargs)
                sequences = out.sequences[:, ids.shape[1]:]
                token_logprobs = recorder.finish(sequences[:, -1])
                completions = [self._completion(sequences[row].tolist(), token_logprobs[row])
                               for row in range(sequences.shape[0])]
                results.append(PromptCompletions(sample=sample, completions=completions))
        finally:
            model.train(was_training)
        return results

    @torch.no_grad()
    def continue_trajectory(self, sample: Sample, ids: list[int], context: ToolContext,
                            sampling: SamplingSettings, max_tokens: int) -> Completion:
        """The next model turn of a trajectory: ``ids`` (the completion so far: model turns and tool turns) after
        the prompt, with the tool images of ``context``. The whole conversation is prefilled again (the model
        places the new images itself, as the learner's forward will)."""
        from r1_mm.models.forward.grouped import merge_vision_inputs

        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        prompt = sample.inputs.to(device)
        keep = prompt["attention_mask"][0].bool()
        full = torch.cat([prompt["input_ids"][0, keep], torch.tensor(ids, dtype=torch.long, device=device)])[None]
        inputs: dict[str, Any] = {"input_ids": full, "attention_mask": torch.ones_like(full)}
        if "mm_token_type_ids" in prompt and context.token_types is not None:
            types = torch.tensor(context.token_types, dtype=prompt["mm_token_type_ids"].dtype, device=device)
            inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"][0, keep], types])[None]
        vision = [{k: v for k, v in prompt.items() if k not in _PER_TOKEN_KEYS}, context.vision]
        inputs.update({k: v.to(device) for k, v in merge_vision_inputs(vision).items()})
        recorder = SampledLogprobs(sampling)
        try:
            out = model.generate(**inputs, logits_processor=LogitsProcessorList([recorder, *self.after_recorder]),
                                 **self._generate_kwargs(sampling, max_tokens))
            sequence = out.sequences[:, full.shape[1]:]
            return self._completion(sequence[0].tolist(), recorder.finish(sequence[:, -1])[0])
        finally:
            model.train(was_training)
