"""Builds the DeepSpeed C++ ops a CPU run compiles on first use, once, at set-up.

Why: DeepSpeed compiles them just in time into ~/.cache/torch_extensions the first time a process
needs them: ``deepspeed_shm_comm`` (collectives between CPU processes: every 2-process DeepSpeed run
here) and ``cpu_adam`` (the optimizer of ZeRO with CPU offload). On a fresh 2-core machine that is
~40 s and ~60 s inside whichever run or test comes first, mid-launch, where it looks like a hang.
Built here, a later load only checks the cache. GPU set-ups skip this: there DeepSpeed's CUDA ops are
built against the machine's toolkit, by DeepSpeed's own rules.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    from deepspeed.ops.op_builder import CPUAdamBuilder
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    for builder in (ShareMemCommBuilder(), CPUAdamBuilder()):
        start = time.perf_counter()
        builder.load(verbose=False)
        print(f"build_deepspeed_ops: {builder.name} ready ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
