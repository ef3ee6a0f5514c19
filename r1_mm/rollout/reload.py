"""Weights reloaded in place into a vLLM engine, without vLLM's false "Failed to load weights".

vLLM 0.32's in-place reload (``model_loader/reload/layerwise.py``, ``finalize_layerwise_processing``)
warns "<Layer>: Failed to load weights" for every layer that holds tensors but was sent none. Some
layers hold only buffers vLLM computes from the config and no checkpoint contains: the rotary cos/sin
caches (``RotaryEmbedding``, ``MRotaryEmbedding``) and the vision tower's pixel normalisation constants
(``FusedMMInputNorm``). So every weight sync warned three times, even a reload of the model's own
checkpoint files, while vLLM did the right thing: it put those layers' buffers back unchanged. The
warning is dropped for such buffer-only layers alone; a layer with parameters that got no weights
still warns (that would be a real missing weight).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
FAILED = "%s: Failed to load weights"


def buffer_only_layers(model: torch.nn.Module) -> set[str]:
    """Class names of the layers that hold buffers and no parameters (no instance of them has any)."""
    with_params: set[str] = set()
    buffers_only: set[str] = set()
    for module in model.modules():
        name = type(module).__name__
        if next(module.parameters(recurse=False), None) is not None:
            with_params.add(name)
        elif next(module.buffers(recurse=False), None) is not None:
            buffers_only.add(name)
    return buffers_only - with_params


class _BufferOnlyFilter(logging.Filter):
    def __init__(self, layers: set[str]):
        super().__init__()
        self.layers = layers

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == FAILED and bool(record.args) and record.args[0] in self.layers)


@contextmanager
def quiet_buffer_only_layers(model: torch.nn.Module) -> Iterator[None]:
    """While reloading ``model``: no "Failed to load weights" for its buffer-only layers."""
    logger = logging.getLogger(LAYERWISE_LOGGER)
    quiet = _BufferOnlyFilter(buffer_only_layers(model))
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def reload_worker(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """In a vLLM worker: reload ``weights`` (Hugging Face names) in place."""
    with quiet_buffer_only_layers(worker.model_runner.get_model()):
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)


def reload_in_place(llm: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Every worker of an in-process ``vllm.LLM`` reloads ``weights``."""
    llm.collective_rpc(reload_worker, args=(weights,))
