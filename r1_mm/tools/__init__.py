"""Tools for agentic rollouts: plugins the policy calls mid-reasoning (crop and zoom into an image, fetch
frames of a video's time span), the parsing of calls from the model's text, and their concurrent execution
with timeouts. The multi-turn loop that uses them lives in :mod:`r1_mm.rollout`."""

from r1_mm.tools.base import Tool, ToolArgumentError, ToolCall, ToolMedia, ToolResult, VideoSource
from r1_mm.tools.registry import ToolError, available, get, tool

__all__ = ["Tool", "ToolArgumentError", "ToolCall", "ToolError", "ToolMedia", "ToolResult", "VideoSource",
           "available", "get", "tool"]
