"""Weights broadcast from learner rank 0 to rollout-server workers over a process group of their own.

NCCL on GPU (vLLM's ``PyNcclCommunicator`` over a ``StatelessProcessGroup``: the learner's own
process group stays untouched), gloo on CPU (a standalone ``ProcessGroupGloo`` on a TCP store). The
server side is a vLLM worker extension, so every worker of a tensor-parallel server joins and loads
the full tensors itself (vLLM shards them). Order and shapes come from a spec list sent over HTTP;
the tensors then travel over the group in that order.

Every collective has a deadline, and the sender also gives up as soon as a server reports that its side
failed: NCCL's broadcast has no timeout, so a server that fails mid-sync (after the handshake) left rank 0
blocked forever. The collective is enqueued, then its completion is polled (a CUDA event on NCCL, the work
handle on gloo) while the caller's ``failed()`` is asked whether a server's reply came back with an error;
on either, the communicator is aborted (vLLM's ``PyNcclCommunicator.destroy`` runs ``ncclCommAbort``, which
also frees the GPU kernel stuck waiting for the peer; gloo's ``abort``) and the channel is unusable.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch

log = logging.getLogger(__name__)

DTYPES = {str(t): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
                              torch.uint8, torch.bool)}


DEFAULT_TIMEOUT_S = 300.0

# Test hook (tests/test_vllm_engines.py): "SYNC:K" makes a server worker raise after receiving K tensors
# of its SYNC-th broadcast sync (1-based), to stand for a server that fails mid-receive. Never set it
# outside tests.
FAIL_RECEIVE_ENV = "R1MM_TEST_FAIL_RECEIVE"


class WeightSyncFailed(RuntimeError):
    """A broadcast collective missed its deadline, or a server reported that its side failed."""


class WeightChannel:
    """One member of a learner -> servers broadcast group (rank 0 is the learner)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: torch.device,
                 timeout_s: float = 600.0):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.broken: str | None = None
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

    def broadcast(self, tensor: torch.Tensor, timeout_s: float = DEFAULT_TIMEOUT_S,
                  failed: Callable[[], str | None] | None = None) -> torch.Tensor:
        """Rank 0 sends ``tensor``; the others receive into it (same shape and dtype). Raises
        WeightSyncFailed (and aborts the channel) when the collective is not done within ``timeout_s``
        or ``failed()`` returns a reason (the sender asks whether any server's reply came back failed)."""
        if self.broken:
            raise WeightSyncFailed(f"weight channel unusable: {self.broken}")
        if self._nccl is not None:
            stream = torch.cuda.current_stream(self.device)
            self._nccl.broadcast(tensor, src=0, stream=stream)  # enqueued; the kernel waits for every peer
            done = torch.cuda.Event()
            done.record(stream)
            self._wait(done.query, timeout_s, failed)
        else:
            opts = torch.distributed.BroadcastOptions()
            opts.rootRank = 0
            work = self._gloo.broadcast([tensor], opts)
            self._wait(work.is_completed, timeout_s, failed)
            work.wait()  # gloo's own error, if the work ended in one
        return tensor

    def _wait(self, is_done: Callable[[], bool], timeout_s: float, failed: Callable[[], str | None] | None) -> None:
        deadline = time.monotonic() + timeout_s
        pause = 1e-5
        while not is_done():
            reason = failed() if failed is not None else None
            if reason is None and time.monotonic() > deadline:
                reason = (f"a weight broadcast collective did not complete within {timeout_s:.0f} s "
                          "(rollout.pool_sync_timeout_s): a member of the group stopped taking part")
            if reason is not None:
                self.abort(reason)
                raise WeightSyncFailed(reason)
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def abort(self, reason: str) -> None:
        """Give the communicator up (a pending collective returns); the channel is unusable after."""
        self.broken = reason
        try:
            if self._nccl is not None:
                self._nccl.destroy()  # ncclCommAbort (in a thread with a 5 s limit, as vLLM runs it)
            elif self._gloo is not None:
                self._gloo.abort()
        except Exception:  # noqa: BLE001 - aborting a failed group is best effort; the reason is what matters
            log.exception("aborting the weight channel failed")

    def receive(self, specs: list[tuple[str, list[int], str]], checksum: Checksum | None = None,
                timeout_s: float = DEFAULT_TIMEOUT_S, fail_after: int | None = None
                ) -> Iterator[tuple[str, torch.Tensor]]:
        for i, (name, shape, dtype) in enumerate(specs):
            if fail_after is not None and i == fail_after:
                raise RuntimeError(f"test hook {FAIL_RECEIVE_ENV}: this server fails after receiving {i} tensor(s)")
            tensor = self.broadcast(torch.empty(shape, dtype=DTYPES[dtype], device=self.device), timeout_s)
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
    r1mm_syncs: int = 0

    def r1mm_open_channel(self, host: str, port: int, world_size: int, rank_offset: int) -> int:
        rank = rank_offset + int(getattr(self, "rank", 0))
        device = getattr(self, "device", None) or torch.device("cpu")
        self.r1mm_channel = WeightChannel(host, port, rank, world_size, torch.device(device))
        return rank

    def r1mm_receive_weights(self, specs: list[tuple[str, list[int], str]],
                             timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
        """Receive and load the tensors, each collective within ``timeout_s`` (a learner that dies
        mid-sync must not hold this server's engine forever); returns the checksum of what arrived."""
        if self.r1mm_channel is None:
            raise RuntimeError("weight channel not open: POST /open_weight_channel first")
        from r1_mm.rollout.reload import reload_worker

        self.r1mm_syncs += 1
        checksum = Checksum()
        reload_worker(self, self.r1mm_channel.receive(specs, checksum, timeout_s, _fail_after(self.r1mm_syncs)))
        return checksum.value()


def _fail_after(sync: int) -> int | None:
    """The test hook's K when it names this sync (see FAIL_RECEIVE_ENV), else None."""
    hook = os.environ.get(FAIL_RECEIVE_ENV)
    if not hook:
        return None
    which, _, after = hook.partition(":")
    return int(after) if int(which) == sync else None
