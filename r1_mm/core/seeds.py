"""The one way r1-mm derives a random seed from the run's seed: ``derive_seed(base, *parts)``.

Every random stream a run draws (each step's rollouts on each process, the data order of each epoch,
the frame shuffles of temporal contrast, ...) gets its own seed from ``training.seed`` and the parts
that name the stream, e.g. ``derive_seed(seed, "grpo.rollout", step, rank)``. Arithmetic formulas
(``seed * 100_003 + step * 101 + salt``) collide for some parts (two streams replaying one sequence)
and were written differently in each place; a hash of the parts does neither. The seed is the same
in every process and every Python run (no ``hash()``, whose strings are salted per process), which
is what resuming a run and comparing ranks rely on.

Convention: the first part after ``base`` is the stream's name (``"data.shuffle"``), so streams of
different users never share a seed even when their numeric parts agree.
"""

from __future__ import annotations

import hashlib
import numbers

SEED_BYTES = 7  # 56 bits: within what torch.manual_seed, vLLM's per-request seed and random.Random take

Part = int | str | None


def _canonical(part: object) -> Part:
    """An integer of any kind (numpy's, torch's via ``int``) as a Python int, so ``np.int64(3)`` and
    ``3`` give one seed; anything whose text could differ between runs (floats, objects) is refused."""
    if part is None or isinstance(part, str):
        return part
    if isinstance(part, numbers.Integral) and not isinstance(part, bool):
        return int(part)
    raise TypeError(f"derive_seed takes ints, strings and None, not {type(part).__name__} ({part!r})")


def derive_seed(base: Part, *parts: Part) -> int:
    """A seed in [0, 2**56) for the stream named by ``parts`` under the run's ``base`` seed.

    Stable across processes, machines and Python runs (SHA-256 of the parts' text); distinct parts
    give unrelated seeds, so nearby steps or ranks do not get overlapping streams."""
    key = tuple(_canonical(p) for p in (base, *parts))
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:SEED_BYTES], "little")
