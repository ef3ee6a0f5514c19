"""Peak memory of this process, measured so that it is this process's own.

Why not ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: on Linux it survives fork and exec, so a
process started by a large parent (a test runner, a notebook) reports the parent's peak until it
outgrows it. The kernel's per-address-space high-water mark (VmHWM) starts afresh at exec.
"""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # other systems: the best available
