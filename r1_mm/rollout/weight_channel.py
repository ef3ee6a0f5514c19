"""Weights broadcast from learner rank 0 to rollout-server workers over a process group of their own.

NCCL on GPU (vLLM's ``PyNcclCommunicator`` over a ``StatelessProcessGroup``: the learner's own
process group stays untouched), gloo on CPU (a standalone ``ProcessGroupGloo`` on a TCP store). The
server side is a vLLM worker extension, so every worker of a tensor-parallel server joins and loads
the full tensors itself (vLLM shards them). Order and shapes come from a spec list sent over HTTP;
the tensors then travel over the group in that order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta

import torch

log = logging.getLogger(__name__)

DTYPES = {str(t): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
                              torch.uint8, torch.bool)}


class WeightChannel:
    """One member of a learner -> servers broadcast group (rank 0 is the learner)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: torch.device,
                 timeout_s: float = 600.0):
        self.rank, self.world_size, self.device = rank, world_size, device
        if device.type == "cuda":
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup

            group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size,
                                                 store_timeout=int(timeout_s))
            self._nccl = PyNcclCommunicator(group, device=device)
            if getattr(self._nccl, "disabled", False) or not getattr(self._nccl, "available", True):
                # vLLM then turns every broadcast into a no-op that returns at once, and the servers
                # would load their uninitialised receive buffers as weights
                raise RuntimeError("vLLM's NCCL communicator is disabled in this process (VLLM_DISABLE_PYNCCL is "
                                   "set, or libnccl cannot be loaded): the weight broadcast would send nothing; "
                                   "fix NCCL or use rollout.pool_weight_sync=shm")
            self._gloo = None
        else:
            from torch.distributed import ProcessGroupGloo, TCPStore

            store = TCPStore(host, port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout_s))
            options = ProcessGroupGloo._Options()
            options._timeout = timedelta(seconds=timeout_s)
            options._devices = [ProcessGroupGloo.create_device(hostname=host)]
            self._gloo = ProcessGroupGloo(store, rank, world_size, options)
            self._nccl = None

    @property
    def backend(self) -> str:
        return "nccl" if self._nccl is not None else "gloo"

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0 sends ``tensor``; the others receive into it (same shape and dtype)."""
        if self._nccl is not None:
            self._nccl.broadcast(tensor, src=0)
            torch.cuda.current_stream(self.device).synchronize()
        else:
            opts = torch.distributed.BroadcastOptions()
            opts.rootRank = 0
            self._gloo.broadcast([tensor], opts).wait()
        return tensor

    def receive(self, specs: list[tuple[str, list[int], str]], checksum: Checksum | None = None
                ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape, dtype in specs:
            tensor = self.broadcast(torch.empty(shape, dtype=DTYPES[dtype], device=self.device))
            if checksum is not None:
                checksum.add(tensor)
            yield name, tensor


class Checksum:
    """A sum over every tensor of a sync, kept on the tensors' device until read (one host sync).

    Why: a broadcast that silently delivers nothing (a disabled NCCL communicator returns at once)
    leaves the receivers with uninitialised buffers; comparing the sender's and each receiver's sums
    after every sync catches it, and any other corruption on the way."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None

    def add(self, tensor: torch.Tensor) -> None:
        part = tensor.detach().double().nan_to_num(0.0, 0.0, 0.0).sum()
        self.total = part if self.total is None else self.total + part.to(self.total.device)

    def value(self) -> float:
        return 0.0 if self.total is None else float(self.total)


def checksums_agree(sent: float, received: float) -> bool:
    return abs(sent - received) <= 1e-6 * max(1.0, abs(sent))


class WeightReceiverExtension:
    """Mixed into every vLLM worker of a rollout server (``worker_extension_cls``)."""

    r1mm_channel: WeightChannel | None = None

    def r1mm_open_channel(self, host: str, port: int, world_size: int, rank_offset: int) -> int:
        rank = rank_offset + int(getattr(self, "rank", 0))
        device = getattr(self, "device", None) or torch.device("cpu")
        self.r1mm_channel = WeightChannel(host, port, rank, world_size, torch.device(device))
        return rank

    def r1mm_receive_weights(self, specs: list[tuple[str, list[int], str]]) -> float:
        """Receive and load the tensors; returns the checksum of what arrived."""
        if self.r1mm_channel is None:
            raise RuntimeError("weight channel not open: POST /open_weight_channel first")
        from r1_mm.rollout.reload import reload_worker

        checksum = Checksum()
        reload_worker(self, self.r1mm_channel.receive(specs, checksum))
        return checksum.value()
