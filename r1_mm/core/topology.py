"""Where the processes of a launch run: how many machines, and the addresses they reach each other at.

Why: a rollout pool rank 0 starts on its own machine must be reachable by learner ranks on the other
machines (127.0.0.1 is not), and the weight broadcast group needs an address of rank 0 that the
rollout servers can connect to. torchrun (under ``accelerate launch``) says how the launch is laid
out in its environment; nothing here guesses from host names.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Topology:
    world_size: int
    local_world_size: int
    machine_rank: int
    main_address: str  # machine 0's address as every machine reaches it (torchrun's MASTER_ADDR)

    @property
    def num_machines(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    @property
    def spans_machines(self) -> bool:
        return self.num_machines > 1


def current() -> Topology:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Topology(world_size=world, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
                    machine_rank=int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0"))),
                    main_address=os.environ.get("MASTER_ADDR", "127.0.0.1"))


def own_server_host(configured: str | None, topology: Topology | None = None) -> str:
    """Where servers this launch starts itself listen and are reached: the recipe's choice, else
    loopback on one machine, else machine 0's address (the servers run beside rank 0)."""
    if configured:
        return configured
    topology = topology or current()
    return topology.main_address if topology.spans_machines else "127.0.0.1"


def address_towards(host: str) -> str:
    """This machine's own address on the route to ``host`` (what ``host`` can connect back to)."""
    if host in LOOPBACK:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(host), 9))  # UDP: picks the route, sends nothing
        return probe.getsockname()[0]
