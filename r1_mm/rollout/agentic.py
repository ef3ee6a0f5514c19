"""Multi-turn rollouts with tools: the model samples a turn, the calls it wrote run, their text and images are
appended to the conversation as the chat template writes tool results, and the model goes on, until it answers
without a call or a limit (``tools.max_turns``, ``tools.max_tool_calls``, ``tools.max_total_tokens``) is hit.

Token in, token out: a trajectory is the sampler's own tokens for the model turns and the tool turns tokenised
alone (:mod:`r1_mm.data.turns`); nothing is decoded and encoded again. Its :class:`ToolContext` tells the
learner which tokens the model sampled (the only ones scored and trained on) and carries the tool images.

Which engines: one that can continue a trajectory from token ids with the tool images
(``continue_trajectory``, or ``continue_trajectories`` for a batch): the hf engine, ``vllm_colocate`` and
``vllm_pool`` (both send the ids with the images' placeholders unexpanded and check that vLLM's expansion equals the
learner's ids; the pool's servers take such token-ids prompts).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from r1_mm.config.recipe import MediaConfig, ToolsConfig
from r1_mm.data.prompts import Sample
from r1_mm.data.turns import (
    TrajectoryBuilder,
    TurnTemplateError,
    budget_image,
    continuation_text,
    encode_turn,
    tool_message,
    unexpanded_turn_ids,
)
from r1_mm.rollout.base import (
    Completion,
    PromptCompletions,
    RolloutEngine,
    SamplingSettings,
    ToolTurn,
    TrajectoryRecord,
)
from r1_mm.tools.base import Tool, ToolMedia
from r1_mm.tools.calls import CALL_FORMATS, ParsedCalls
from r1_mm.tools.executor import ToolExecutor, ToolOutcome, error_result, parse_failure
from r1_mm.tools.registry import get as get_tool
from r1_mm.tools.row_media import tool_media


@dataclass
class _Trajectory:
    sample: Sample
    builder: TrajectoryBuilder
    last_text: str
    truncated: bool
    turns: list[ToolTurn] = field(default_factory=list)
    calls_made: int = 0
    model_turns: int = 1
    tool_pixels: int = 0  # pixels of the tool images shown so far (tools.max_total_pixels)
    stop: str = ""  # why it ended: answer, max_turns, max_tool_calls, max_total_tokens, truncated


def tools_of(cfg: ToolsConfig) -> dict[str, Tool]:
    """The recipe's tools, each with its recipe kwargs."""
    return {entry.name: entry for entry in (get_tool(spec.name).with_kwargs(spec.kwargs) for spec in cfg.functions)}


def tool_schemas(cfg: ToolsConfig) -> list[dict[str, Any]] | None:
    """The function schemas the prompts show the model (None for a recipe without tools, or one whose model was
    taught its tools and is not shown them: ``tools.schemas_in_prompt: false``)."""
    if not cfg.functions or not cfg.schemas_in_prompt:
        return None
    return [entry.schema() for entry in tools_of(cfg).values()]


class ToolRollout(RolloutEngine):
    """Wraps an engine that samples turns; runs the recipe's tools between them."""

    def __init__(self, engine: RolloutEngine, processor: Any, tools: ToolsConfig, media: MediaConfig):
        if not any(callable(getattr(engine, m, None)) for m in ("continue_trajectory", "continue_trajectories")):
            raise ValueError(f"rollout engine '{engine.name}' cannot continue a trajectory after a tool turn; "
                             "agentic rollouts run on rollout.engine=hf, vllm_colocate or vllm_pool")
        self.engine = engine
        self.name = engine.name
        self.samples_from_policy = getattr(engine, "samples_from_policy", False)
        self.generates_beside_learner = getattr(engine, "generates_beside_learner", False)
        self.processor = processor
        self.cfg = tools
        self.media = media
        self.call_format = CALL_FORMATS.get(tools.call_format)
        self.executor = ToolExecutor(tools_of(tools), timeout_s=tools.call_timeout_s, workers=tools.workers)
        tokenizer = getattr(processor, "tokenizer", processor)
        self.end_of_turn = {i: tokenizer.convert_ids_to_tokens(i) for i in engine.eos} if hasattr(engine, "eos") else {}
        self.stats: dict[str, float] = {}

    # -- the engine interface -------------------------------------------------------------------------
    def update_weights(self, model: Any) -> None:
        self.engine.update_weights(model)

    def close(self) -> None:
        self.executor.close()
        self.engine.close()

    def info(self) -> dict[str, Any]:
        return {**self.engine.info(), "tools": sorted(self.executor.tools), "call_format": self.cfg.call_format}

    def schemas(self) -> list[dict[str, Any]]:
        return self.executor.schemas()

    def generate(self, batch: list[Sample], n: int, sampling: SamplingSettings) -> list[PromptCompletions]:
        awake = getattr(self.engine, "awake", None)  # an engine that sleeps between rollouts stays up for all turns
        with awake() if callable(awake) else contextlib.nullcontext():
            return self._generate(batch, n, sampling)

    def _generate(self, batch: list[Sample], n: int, sampling: SamplingSettings) -> list[PromptCompletions]:
        first = self.engine.generate(batch, n, sampling)
        with_types = any("mm_token_type_ids" in s.inputs for s in batch)
        trajectories: list[list[_Trajectory]] = []
        for result in first:
            group = []
            for c in result.completions:
                builder = TrajectoryBuilder(with_token_types=with_types)
                builder.add_model_turn(c.token_ids, c.logprobs)
                group.append(_Trajectory(result.sample, builder, c.text, c.truncated))
            trajectories.append(group)
        flat = [t for group in trajectories for t in group]
        media_cache: dict[int, ToolMedia] = {}
        for _ in range(self.cfg.max_turns - 1):
            live = [t for t in flat if self._wants_tools(t)]
            if not live:
                break
            self._run_tool_turns(live, media_cache)
            going = []
            for t in live:
                if t.stop:
                    continue
                budget = self._turn_budget(t, sampling)
                if budget <= 0:
                    t.stop = "max_total_tokens"
                    continue
                going.append((t, budget))
            for (t, _), turn in zip(going, self._continue(going, sampling), strict=True):
                t.builder.add_model_turn(turn.token_ids, turn.logprobs)
                t.last_text, t.truncated = turn.text, turn.truncated
                t.model_turns += 1
        for t in flat:
            if not t.stop:
                t.stop = "truncated" if t.truncated else ("answer" if not self._parse(t.last_text).attempted
                                                          else "max_turns")
        self.stats = self._stats(flat)
        return [PromptCompletions(sample=r.sample, completions=[self._completion(t) for t in group],
                                  prompt_token_ids=r.prompt_token_ids) for r, group in zip(first, trajectories)]

    # -- turns ----------------------------------------------------------------------------------------
    def _continue(self, going: list[tuple[_Trajectory, int]], sampling: SamplingSettings) -> list[Completion]:
        """The next model turn of each trajectory: in one batch where the engine takes one (vLLM), else one by one."""
        items = [(t.sample, t.builder.ids, t.builder.context(), budget) for t, budget in going]
        if not items:
            return []
        batched = getattr(self.engine, "continue_trajectories", None)
        if callable(batched):
            return batched(items, sampling)
        return [self.engine.continue_trajectory(sample, ids, context, sampling, budget)
                for sample, ids, context, budget in items]

    def _parse(self, text: str) -> ParsedCalls:
        return self.call_format.parse(text)

    def _wants_tools(self, t: _Trajectory) -> bool:
        if t.stop or t.truncated:
            return False
        if not self._parse(t.last_text).attempted:
            return False
        if t.calls_made >= self.cfg.max_tool_calls:
            t.stop = "max_tool_calls"
            return False
        return True

    def _turn_budget(self, t: _Trajectory, sampling: SamplingSettings) -> int:
        total = self.cfg.max_total_tokens
        left = sampling.max_tokens if total is None else min(sampling.max_tokens, total - len(t.builder.ids))
        return left

    def _run_tool_turns(self, live: list[_Trajectory], media_cache: dict[int, ToolMedia]) -> None:
        """Every live trajectory's calls of its last turn, run together; then each trajectory's tool turn."""
        planned: list[tuple[_Trajectory, list[ToolOutcome | None], list]] = []
        requests = []
        for t in live:
            parsed = self._parse(t.last_text)
            room = self.cfg.max_tool_calls - t.calls_made
            outcomes: list[ToolOutcome | None] = [parse_failure(e) for e in parsed.errors]
            runnable = parsed.calls[:room]
            for call in parsed.calls[room:]:
                outcomes.append(ToolOutcome(call, "over_limit", error_result(
                    f"tools.max_tool_calls ({self.cfg.max_tool_calls}) reached; {call.name} was not run")))
            key = id(t.sample)
            if key not in media_cache:
                media_cache[key] = tool_media(t.sample, t.sample.media_root)
            slots = []
            for call in runnable:
                slots.append(len(requests))
                requests.append((call, media_cache[key]))
            planned.append((t, outcomes, slots))
        results = self.executor.run(requests) if requests else []
        for t, outcomes, slots in planned:
            ran = [results[i] for i in slots]
            t.calls_made += len(ran)
            self._append_tool_turn(t, ran + [o for o in outcomes if o is not None])

    def _append_tool_turn(self, t: _Trajectory, outcomes: list[ToolOutcome]) -> None:
        messages, images, record = [], [], ToolTurn()
        for o in outcomes:
            kept = o.result.images[: self.cfg.max_images_per_call]
            budgeted = []
            for im in kept:
                im = budget_image(im, self.processor, min_pixels=self.media.min_pixels,
                                  max_pixels=self.cfg.max_pixels_per_image)
                if t.tool_pixels + im.width * im.height > self.cfg.max_total_pixels:
                    break  # this and the call's later images are dropped (counted), the text says so
                t.tool_pixels += im.width * im.height
                budgeted.append(im)
            if len(budgeted) < len(o.result.images):
                o.result.text += (f" ({len(o.result.images) - len(budgeted)} image(s) not shown: tools.max_images_per_call "
                                  f"{self.cfg.max_images_per_call}, tools.max_total_pixels {self.cfg.max_total_pixels})")
            images += budgeted
            messages.append(tool_message(o.result.text, len(budgeted)))
            record.calls.append({"name": o.call.name if o.call else None,
                                 "arguments": json.loads(json.dumps(dict(o.call.arguments))) if o.call else None,
                                 "status": o.status, "text": o.result.text, "images": len(budgeted),
                                 "dropped_images": len(o.result.images) - len(budgeted)})
        record.images = list(images)
        end = self.end_of_turn.get(t.builder.ids[-1])
        try:
            text = continuation_text(self.processor, messages, end or "")
        except TurnTemplateError:  # the turn ended with another end token (<|endoftext|>): the conversation is over
            t.stop = "answer"
            return
        inputs = encode_turn(self.processor, text, images)
        total = self.cfg.max_total_tokens
        if total is not None and len(t.builder.ids) + int(inputs["input_ids"].shape[1]) >= total:
            t.stop = "max_total_tokens"
            t.turns.append(record)
            return
        t.builder.add_tool_turn(inputs, images, unexpanded_turn_ids(self.processor, text))
        t.turns.append(record)

    # -- results --------------------------------------------------------------------------------------
    def _completion(self, t: _Trajectory) -> Completion:
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        ids = t.builder.ids
        record = TrajectoryRecord(turns=[replace(turn) for turn in t.turns], model_turns=t.model_turns,
                                  final_text=t.last_text, stop_reason=t.stop)
        return Completion(text=tokenizer.decode(ids, skip_special_tokens=True), token_ids=list(ids),
                          logprobs=list(t.builder.logprobs), truncated=t.truncated or t.stop == "max_total_tokens",
                          context=t.builder.context(), trajectory=record)

    def _stats(self, flat: list[_Trajectory]) -> dict[str, float]:
        n = max(1, len(flat))
        calls = [c for t in flat for turn in t.turns for c in turn.calls]
        statuses = Counter(c["status"] for c in calls)
        executed = [t for t in flat if any(turn.executed for turn in t.turns)]
        out = {"tools/call_rate": len(executed) / n,
               "tools/success_rate": statuses["ok"] / len(calls) if calls else float("nan"),
               "tools/calls_per_trajectory": len(calls) / n,
               "tools/turns": sum(t.model_turns for t in flat) / n,
               "tools/tool_tokens": sum(t.builder.num_tool_tokens for t in flat) / n,
               "tools/dropped_images": sum(c.get("dropped_images", 0) for c in calls) / n}
        for status, count in statuses.items():
            if status != "ok":
                out[f"tools/errors/{status}"] = count / n
        for reason, count in Counter(t.stop for t in flat).items():
            out[f"tools/stop/{reason}"] = count / n
        return out


def accuracy_by_call(correct: list[bool | None], called: list[bool]) -> dict[str, float]:
    """Accuracy of the trajectories that executed a call and of those that did not (NaN where there are none):
    whether calling helps, the number a zoom-in run is judged by."""
    out = {}
    for name, want in (("tools/accuracy_with_call", True), ("tools/accuracy_without_call", False)):
        picked = [float(c) for c, k in zip(correct, called, strict=True) if k == want and c is not None]
        out[name] = sum(picked) / len(picked) if picked else float("nan")
    return out
