"""Weights reloaded in place into a vLLM engine, without vLLM's false "Failed to load weights".

vLLM 0.32's in-place reload (``model_loader/reload/layerwise.py``, ``finalize_layerwise_processing``)
warns "<Layer>: Failed to load weights" for every layer that holds tensors but was sent none. Some
layers hold only buffers vLLM computes from the config and no checkpoint contains: the rotary cos/sin
caches (``RotaryEmbedding``, ``MRotaryEmbedding``) and the vision tower's pixel normalisation constants
(``FusedMMInputNorm``). So every weight sync warned three times, even a reload of the model's own
checkpoint files, while vLLM did the right thing: it put those layers' buffers back unchanged. The
warning is dropped for such buffer-only layers alone; a layer with parameters that got no weights
still warns (that would be a real missing weight).

What crosses ``collective_rpc`` must be picklable: vLLM's multiprocess executor (``mp``, what tensor
parallel > 1 uses, or ``rollout.vllm_executor=mp``) pickles every argument to its worker processes, and
a generator of tensors cannot be pickled ("cannot pickle 'generator' object": the sync and the restore
after a failed one both failed, and the server marked itself broken). So a worker that lives in another
process is sent a folder path and reads the safetensors itself (:func:`reload_from_folder`); only an
engine whose workers run in this process (``uni`` or ``external_launcher`` executor, in-process engine
core) is handed the live stream, where nothing is pickled and no copy of the weights is made.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
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
    """In a vLLM worker: reload ``weights`` (Hugging Face names) in place, finished on the device when
    this returns.

    Why the device sync: an in-process worker reloads on the thread that called it (the rollout server's
    HTTP thread), whose copies are queued on that thread's current CUDA stream, while generation runs on
    the engine thread's; the server releases its engine lock when this returns, so without the sync the
    next step could read weights still being copied. A worker process runs RPCs and steps on one thread,
    where the sync only costs the wait for copies that were about to finish anyway."""
    model = worker.model_runner.get_model()
    with quiet_buffer_only_layers(model):
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    repack_cpu_experts(model)
    if torch.cuda.is_available():
        torch.cuda.synchronize(getattr(worker, "device", None))


def repack_cpu_experts(model: torch.nn.Module) -> int:
    """Re-pack the experts of every mixture-of-experts layer that runs on vLLM's CPU kernel; returns how many.

    Why: vLLM 0.32's CPU MoE kernel reads expert weights in a pre-packed layout it makes once, after the
    first load (``CPUUnquantizedExperts.process_weights_after_loading``). An in-place reload copies the new
    weights into that storage in the checkpoint's plain layout and skips the packing ("the moe kernel has
    already been set up", ``UnquantizedFusedMoEMethod._setup_kernel``), so after every sync the kernel read
    plain weights as packed ones: Qwen3-VL-MoE's sampler differed from the learner by 0.57 nats. GPU kernels
    read the plain layout and are not touched."""
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
            CPUUnquantizedExperts,
            cpu_prepack_moe_weight,
        )
        from vllm.model_executor.utils import replace_parameter
    except ImportError:  # a vLLM without the CPU kernel
        return 0
    repacked = 0
    for module in model.modules():
        experts = getattr(getattr(getattr(module, "quant_method", None), "moe_kernel", None), "fused_experts", None)
        if not isinstance(experts, CPUUnquantizedExperts) or experts._use_zentorch:
            continue
        config = experts.moe_config
        if experts._padded_intermediate_size(config) != config.intermediate_size_per_partition:
            raise NotImplementedError(
                f"vLLM's CPU MoE kernel pads this model's expert width ({config.intermediate_size_per_partition}) and "
                f"its weights cannot be re-packed after a reload; use a width divisible by {experts._intermediate_alignment()}")
        replace_parameter(module, "w13_weight", cpu_prepack_moe_weight(module.w13_weight, experts.isa))
        replace_parameter(module, "w2_weight", cpu_prepack_moe_weight(module.w2_weight, experts.isa))
        repacked += 1
    return repacked


def read_weights(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from every safetensors file in ``folder``, one tensor at a time."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, handle.get_tensor(name)


def reload_from_folder(worker: Any, folder: str) -> None:
    """In a vLLM worker (any process): reload the safetensors in ``folder`` in place. Sent by
    reference (a module-level function) with a string: both pickle."""
    reload_worker(worker, read_weights(folder))


def workers_in_process(llm: Any) -> bool:
    """Does ``collective_rpc`` call the workers in this process (arguments passed as they are), or
    pickle them to other processes? Read from the engine's own state: its engine-core client (vLLM
    runs the core in another process unless VLLM_ENABLE_V1_MULTIPROCESSING=0) and its executor."""
    engine = llm.llm_engine
    core = engine.engine_core
    if type(core).__name__ != "InprocClient":
        return False
    return engine.vllm_config.parallel_config.distributed_executor_backend in ("uni", "external_launcher")


def reload_in_place(llm: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Every worker of ``llm`` reloads ``weights``, a stream only an in-process worker can take."""
    if not workers_in_process(llm):
        raise TypeError("this vLLM engine's workers run in other processes, which get pickled arguments: send "
                        "a folder of safetensors (reload_folder_in_place), not a stream of tensors")
    llm.collective_rpc(reload_worker, args=(weights,))


def reload_folder_in_place(llm: Any, folder: str | Path) -> None:
    """Every worker of ``llm``, in this process or another, reloads the safetensors in ``folder``."""
    llm.collective_rpc(reload_from_folder, args=(str(folder),))


def write_weight_files(weights: Iterable[tuple[str, torch.Tensor]], folder: Path, bucket_mb: int) -> None:
    """``weights`` as safetensors files of about ``bucket_mb`` each in ``folder`` (on the host)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    limit = bucket_mb * 2**20
    bucket: dict[str, torch.Tensor] = {}
    size, part = 0, 0
    for name, tensor in weights:
        bucket[name] = tensor.contiguous().cpu()
        size += tensor.numel() * tensor.element_size()
        if size >= limit:
            save_file(bucket, str(folder / f"part-{part:05d}.safetensors"))
            bucket, size, part = {}, 0, part + 1
    if bucket:
        save_file(bucket, str(folder / f"part-{part:05d}.safetensors"))
