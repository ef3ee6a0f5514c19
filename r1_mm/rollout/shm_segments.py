"""Shared-memory weight folders (``/dev/shm/r1mm-weights-PID-XXXX``) that do not outlive their run.

vllm_pool's learner writes the policy there after every update (servers reload it in place). /dev/shm is
RAM: a learner killed with SIGKILL (the OOM killer, a scheduler) runs no cleanup, and its folder, the
size of the model, stayed until reboot. So each folder has an owner: the pid in its name and an
exclusive lock on its ``.owner`` file, which the kernel releases when that process dies (whatever pid
namespace looks at it). The owner removes its folder on every exit path it can see (close, an error
while starting, interpreter exit), and every start removes the folders whose owner is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

PREFIX = "r1mm-weights-"
OWNER_FILE = ".owner"
_PID = re.compile(rf"^{PREFIX}(\d+)-")


def default_root() -> Path | None:
    """/dev/shm where it exists (Linux); elsewhere the temporary folder."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else None


class WeightSegment:
    """A folder this process owns until :meth:`remove` (or its death)."""

    def __init__(self, root: Path | None = None):
        root = root if root is not None else default_root()
        remove_stale_segments(root)
        self.path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
        self._owner: IO[str] | None = open(self.path / OWNER_FILE, "w")  # noqa: SIM115 (held for the folder's life)
        fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._owner.write(f"{os.getpid()}\n")
        self._owner.flush()
        atexit.register(self.remove)

    def remove(self) -> None:
        """Idempotent; also runs at interpreter exit."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._owner is not None:
            self._owner.close()
            self._owner = None
        atexit.unregister(self.remove)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def owner_gone(folder: Path) -> bool:
    """True only when both say so: the pid in the name is not running here, and nobody holds the owner
    lock (a folder just created has no lock yet; a pid reused by another program keeps it, which only
    delays its removal). Folders without a pid in their name (older versions) are left alone."""
    match = _PID.match(folder.name)
    if match is None or _pid_alive(int(match.group(1))):
        return False
    try:
        with open(folder / OWNER_FILE, "rb") as owner:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(owner, fcntl.LOCK_UN)
    except FileNotFoundError:
        return True  # killed between creating the folder and its owner file
    except OSError:
        return False  # locked: the owner lives (in another pid namespace), or another start is removing it
    return True


def remove_stale_segments(root: Path | None = None) -> list[Path]:
    """Remove this user's weight folders whose owner is gone; returns them."""
    root = root if root is not None else default_root()
    base = Path(root if root is not None else tempfile.gettempdir())
    removed = []
    for folder in sorted(base.glob(f"{PREFIX}*")):
        with contextlib.suppress(OSError):
            if folder.is_dir() and folder.stat().st_uid == os.getuid() and owner_gone(folder):
                size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                shutil.rmtree(folder)
                removed.append(folder)
                log.warning("removed %s: shared-memory weights (%.1f MiB) left by process %s, which is gone",
                            folder, size / 2**20, _PID.match(folder.name).group(1))
    return removed
