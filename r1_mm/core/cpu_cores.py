"""Cores of a CPU machine split between rollout servers and learners (``rollout.pool_cpu_cores``).

Why: on a GPU machine a vllm_pool server runs on GPUs of its own, beside the learners' (``server_devices``), so
sampling and learning can overlap (``rollout.max_staleness`` > 0) without slowing each other. On a CPU machine
every process uses every core by default, and overlapping two phases that each take all cores mostly makes
both slower (bench/README.md: learn 7.9 -> 11.3 s beside the server). Giving each server cores of its own and
the learners the rest is the CPU stand-in for its own GPUs: what asynchronous rollouts are measured against.

Linux only (``os.sched_setaffinity``); a server gets its cores before it execs (``ServerProcess``), a learner
process pins itself (``pin_this_process``). torch sizes its thread pool by the affinity a process starts with,
so a pinned learner also sets its thread count, through ``torch._C.set_num_threads``: vLLM's CPU worker replaces
``torch.set_num_threads`` with a no-op in the process it runs in (vllm/v1/worker/cpu_worker.py), so in a process
that ran a colocated engine before (a test session, a demo running several recipes) the public call did nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def parse_cores(text: str | int) -> list[int]:
    """``"1"``, ``"2-3"``, ``"0,2-3"`` -> sorted core ids; ValueError naming the text otherwise."""
    cores: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                if first > last:
                    raise ValueError
                cores.update(range(first, last + 1))
            else:
                cores.add(int(part))
        except ValueError:
            raise ValueError(f"{text!r} is not a core list (like '1', '2-3' or '0,2-3')") from None
    if any(c < 0 for c in cores):
        raise ValueError(f"{text!r} names a negative core")
    return sorted(cores)


def allowed_cores() -> set[int]:
    """The cores this process may run on (its affinity), or every core where affinity is not supported."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def layout_problems(entries: list[str | int], allowed: set[int] | None = None) -> list[str]:
    """Why ``rollout.pool_cpu_cores`` cannot be laid out: an entry that is no core list, or that shares cores with
    another; with ``allowed`` (this machine's, preflight) also cores outside it, or none left for the learners."""
    problems, taken = [], set()
    for i, entry in enumerate(entries):
        try:
            cores = set(parse_cores(entry))
        except ValueError as exc:
            problems.append(f"rollout.pool_cpu_cores[{i}]: {exc}")
            continue
        if allowed is not None and cores - allowed:
            problems.append(f"rollout.pool_cpu_cores[{i}] ({entry}) names core(s) {sorted(cores - allowed)} this "
                            f"process may not use (allowed: {compact(allowed)})")
        if cores & taken:
            problems.append(f"rollout.pool_cpu_cores[{i}] ({entry}) shares core(s) {sorted(cores & taken)} with "
                            "another server")
        taken |= cores
    if allowed is not None and not problems and not allowed - taken:
        problems.append(f"rollout.pool_cpu_cores takes every core this process may use ({compact(allowed)}): leave "
                        "at least one for the learner")
    return problems


def learner_cores(entries: list[str | int], allowed: set[int]) -> list[int]:
    """The cores left to the learner processes once every server has its own."""
    taken = {c for entry in entries for c in parse_cores(entry)}
    return sorted(allowed - taken)


def pin_this_process(cores: list[int], processes_sharing: int = 1) -> int:
    """Run this process on ``cores`` with torch's thread pool sized to its share of them; returns the threads."""
    import torch

    os.sched_setaffinity(0, cores)
    threads = max(1, len(cores) // max(1, processes_sharing))
    torch._C.set_num_threads(threads)  # not torch.set_num_threads: see the module's docstring
    return threads


def restorer(cores: set[int]) -> Callable[[], None]:
    """A call that puts this process back on ``cores`` with torch's thread count of now (when the pinning ends)."""
    import torch

    threads = torch.get_num_threads()

    def restore() -> None:
        os.sched_setaffinity(0, cores)
        torch._C.set_num_threads(threads)

    return restore


def compact(cores: set[int] | list[int]) -> str:
    """Core ids as a short list: {0, 1, 2, 5} -> '0-2,5'."""
    ordered, parts = sorted(cores), []
    start = prev = None
    for c in ordered + [None]:
        if c is not None and prev is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = c
    return ",".join(parts)
