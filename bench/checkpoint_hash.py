"""What checkpoint hashing costs: writing a manifest (sha256 of every file) and verifying it, on a
folder of random files shaped like a checkpoint (a few large shards plus small files). Usage:

    .venv/bin/python bench/checkpoint_hash.py                  # 2 GiB in 4 shards, in the temp folder
    .venv/bin/python bench/checkpoint_hash.py --gib 8 --dir /path/on/the/checkpoint/filesystem

Both passes read from the page cache, as a save does (it hashes files it has just written); a resume
on a cold cache also pays the filesystem's read speed, whichever is slower.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from r1_mm.run.checkpoint import STATE_FILE, damage, write_manifest


def make_folder(root: Path, gib: float, shards: int) -> int:
    chunk = os.urandom(1 << 24)  # 16 MiB, repeated: content does not change sha256's speed
    per_shard = int(gib * 2**30 / shards)
    for i in range(shards):
        with (root / f"shard-{i:02d}.bin").open("wb") as f:
            left = per_shard
            while left > 0:
                f.write(chunk[:min(left, len(chunk))])
                left -= len(chunk)
    (root / STATE_FILE).write_text('{"step": 1}')
    return per_shard * shards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--dir", default=None, help="where to write the test folder (default: the temp folder)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="r1mm-hash-bench-", dir=args.dir))
    try:
        size = make_folder(root, args.gib, args.shards)
        t0 = time.perf_counter()
        write_manifest(root)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert damage(root) is None
        t_verify = time.perf_counter() - t0
        gib = size / 2**30
        print(f"| data | cpus | manifest (hash all) | verify (sizes + hash all) |\n|---|---|---|---|\n"
              f"| {gib:.1f} GiB in {args.shards} files | {os.cpu_count()} | {t_write:.2f} s ({gib / t_write:.2f} GiB/s) "
              f"| {t_verify:.2f} s ({gib / t_verify:.2f} GiB/s) |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
