"""Tool calls read from the model's own text, in the format its chat template teaches.

Why formats are registry entries: the Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) writes the
Hermes form, a JSON object inside ``<tool_call>...</tool_call>``; other families write other forms (GLM-4.5's
``<arg_key>``/``<arg_value>`` pairs). Adding one is one parse function registered here; the recipe picks it
(``tools.call_format``).

A malformed call is not an exception: it is returned as an error text for the model (the turn's result says
what was wrong) and counted, so one bad call never stops the run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from r1_mm.core.registry import Registry
from r1_mm.tools.base import ToolCall


@dataclass
class ParsedCalls:
    """The calls of one model turn, and a message for each call that could not be read."""

    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def attempted(self) -> int:
        return len(self.calls) + len(self.errors)


@dataclass(frozen=True)
class CallFormat:
    """How one family writes calls: ``parse`` reads a turn's text; ``end`` is the text a turn with a call ends
    with (generation stops there, the tool runs, and the conversation goes on)."""

    name: str
    parse: Callable[[str], ParsedCalls]
    end: str


CALL_FORMATS: Registry[CallFormat] = Registry("tool call format")

HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


def parse_hermes(text: str) -> ParsedCalls:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Qwen's chat templates); arguments
    given as a JSON string are read as JSON too (some checkpoints write them so)."""
    out = ParsedCalls()
    for number, match in enumerate(HERMES_BLOCK.finditer(text), start=1):
        body, closed = match.group(1).strip(), bool(match.group(2))
        where = f"tool call {number}"
        if not closed:
            out.errors.append(f"{where}: <tool_call> is not closed by </tool_call>")
            continue
        try:
            call = json.loads(body)
        except json.JSONDecodeError as exc:
            out.errors.append(f"{where}: not valid JSON ({exc.msg} at character {exc.pos}); write "
                              '{"name": "<tool>", "arguments": {...}}')
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            out.errors.append(f'{where}: expected a JSON object with a "name" string and an "arguments" object')
            continue
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            out.errors.append(f'{where} ({call["name"]}): "arguments" must be a JSON object')
            continue
        out.calls.append(ToolCall(name=call["name"], arguments=arguments, raw=match.group(0)))
    return out


CALL_FORMATS.register("hermes", CallFormat("hermes", parse_hermes, end="</tool_call>"))


def parse_calls(text: str, call_format: str = "hermes") -> ParsedCalls:
    return CALL_FORMATS.get(call_format).parse(text)
