"""The broadcast weight channel refuses a disabled NCCL communicator (vLLM turns every broadcast into
a no-op then, and the servers would load uninitialised buffers), and the checksum compared after every
sync tells a delivered broadcast from one that delivered nothing. No CUDA or NCCL here: vLLM's
communicator and process group are stand-ins (the test says so); the check and the checksum are real.
A collective whose peer stopped taking part ends at its deadline, or at once when the caller learns a
server failed (a real gloo group of two members in this process; NCCL takes the same path with a CUDA
event in place of gloo's work handle)."""

from __future__ import annotations

import pytest
import torch

from r1_mm.rollout import weight_channel
from r1_mm.rollout.weight_channel import Checksum, WeightChannel, checksums_agree


class DisabledCommunicator:
    """What vLLM's PyNcclCommunicator is when VLLM_DISABLE_PYNCCL is set or libnccl does not load."""

    def __init__(self, group, device):
        self.available, self.disabled = False, True


def test_a_disabled_nccl_communicator_is_refused(monkeypatch):
    import vllm.distributed.device_communicators.pynccl as pynccl
    import vllm.distributed.utils as vllm_utils

    monkeypatch.setattr(pynccl, "PyNcclCommunicator", DisabledCommunicator)
    monkeypatch.setattr(vllm_utils.StatelessProcessGroup, "create", staticmethod(lambda **kwargs: object()))
    with pytest.raises(RuntimeError, match="NCCL communicator is disabled"):
        WeightChannel("127.0.0.1", 1, 0, 2, torch.device("cuda", 0))


class NoOpChannel(WeightChannel):
    """A receiver whose broadcast returns at once, as a disabled communicator's does."""

    def __init__(self):
        self.device = torch.device("cpu")

    def broadcast(self, tensor, timeout_s=None, failed=None):
        return tensor


def test_checksums_tell_a_delivered_sync_from_an_empty_one():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(64, 32, generator=g), torch.randn(32, generator=g).to(torch.bfloat16)]
    sent = Checksum()
    for t in tensors:
        sent.add(t)
    delivered = Checksum()
    for t in tensors:
        delivered.add(t.clone())
    assert checksums_agree(sent.value(), delivered.value())
    empty = Checksum()
    specs = [("a", [64, 32], "torch.float32"), ("b", [32], "torch.bfloat16")]
    received = list(NoOpChannel().receive(specs, empty))
    assert [name for name, _ in received] == ["a", "b"]
    assert not checksums_agree(sent.value(), empty.value())
    assert weight_channel.Checksum().value() == 0.0


@pytest.fixture
def gloo_pair():
    """Rank 0 and rank 1 of a real gloo group (rank 1 will not take part in the broadcast)."""
    import threading

    from r1_mm.rollout.servers import free_port

    port = free_port()
    members: dict[int, WeightChannel] = {}

    def join(rank: int) -> None:
        members[rank] = WeightChannel("127.0.0.1", port, rank, 2, torch.device("cpu"), timeout_s=60)

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(members) == {0, 1}
    return members


# 64 MiB: more than the loopback socket buffers take, so the send cannot complete without the peer
BIG = (16, 2**20)


def test_a_broadcast_whose_peer_stopped_ends_at_its_deadline(gloo_pair):
    sender = gloo_pair[0]
    with pytest.raises(weight_channel.WeightSyncFailed, match="did not complete within 1 s"):
        sender.broadcast(torch.ones(BIG), timeout_s=1.0)
    assert sender.broken  # aborted: the next collective refuses at once instead of joining a dead group
    with pytest.raises(weight_channel.WeightSyncFailed, match="unusable"):
        sender.broadcast(torch.ones(4))


def test_a_broadcast_stops_at_once_with_the_servers_error(gloo_pair):
    """The caller's ``failed()`` (the pool: has any server's reply come back with an error?) is asked while
    the collective is pending; its reason ends the wait long before the deadline and is the error."""
    asked = []

    def failed():
        asked.append(1)
        return "rollout server http://s:1 failed: HTTP 503 worker raised" if len(asked) >= 3 else None

    with pytest.raises(weight_channel.WeightSyncFailed, match="HTTP 503 worker raised"):
        gloo_pair[0].broadcast(torch.ones(BIG), timeout_s=3600.0, failed=failed)
    assert len(asked) == 3  # the premise: the collective was still pending while the caller was asked
