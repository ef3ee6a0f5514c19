"""The broadcast weight channel refuses a disabled NCCL communicator (vLLM turns every broadcast into
a no-op then, and the servers would load uninitialised buffers), and the checksum compared after every
sync tells a delivered broadcast from one that delivered nothing. No CUDA or NCCL here: vLLM's
communicator and process group are stand-ins (the test says so); the check and the checksum are real."""

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

    def broadcast(self, tensor):
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
