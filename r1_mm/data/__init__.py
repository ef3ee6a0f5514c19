"""Datasets, the row schema (docs/data.md) and prompt building."""

from r1_mm.data.dataset import DataReport, PromptStream
from r1_mm.data.loading import DataError, read_rows
from r1_mm.data.prompts import PromptBuilder, PromptTooLongError, Sample, build_messages, encode_prompts

__all__ = ["DataError", "DataReport", "PromptBuilder", "PromptStream", "PromptTooLongError", "Sample",
           "build_messages", "encode_prompts", "read_rows"]
