"""Video decoding: r1-mm's loader vs transformers' own (``transformers.video_utils.load_video``, PyAV
backend) on the same clips, keeping 16 evenly spaced frames: decode time and peak memory growth.

The clips are synthetic 640x480 H.264 videos at 30 fps (x264's default keyframe interval, 250
frames) of 15, 30 and 60 s, written once under a temporary folder. Each (clip, loader) runs in its
own process, so peak RSS is its own. Usage:

    .venv/bin/python bench/media.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FRAMES = 16
LENGTHS_S = (15, 30, 60)


def worker(loader: str, path: str, repeats: int) -> dict:
    import numpy as np

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if loader == "r1-mm":
            from r1_mm import media
            from r1_mm.config import MediaConfig

            cfg = MediaConfig(nframes=FRAMES, video_max_pixels=640 * 480, video_total_pixels=10**10)
            frames = media.load_video(path, cfg, factor=2).frames  # factor 2: no resize, the raw decode is timed
        else:
            from transformers.video_utils import load_video

            frames, _ = load_video(path, num_frames=FRAMES, backend="pyav")
        times.append(time.perf_counter() - t0)
        assert np.asarray(frames).shape[0] == FRAMES
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    out = {"loader": loader, "seconds": sorted(times)[len(times) // 2], "peak_growth_mib": grown / 2**20}
    if loader == "r1-mm":
        from r1_mm import media

        out["frames_decoded"] = media.DECODE_STATS["frames_decoded"] / repeats
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", nargs=2, metavar=("LOADER", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], args.worker[1], args.repeats)))
        return
    from r1_mm.testing.synthetic import clock_frames, write_mp4

    root = Path(tempfile.mkdtemp(prefix="r1mm-bench-media-"))
    rows = []
    for seconds in LENGTHS_S:
        clip = write_mp4(clock_frames(seconds, 30, height=480, width=640), root / f"clip_{seconds}s.mp4", 30)
        result = {}
        for loader in ("transformers", "r1-mm"):
            proc = subprocess.run([sys.executable, __file__, "--worker", loader, str(clip), "--repeats", str(args.repeats)],
                                  capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"worker {loader} on {clip.name} failed:\n{proc.stderr[-3000:]}")
            result[loader] = json.loads(line[0][7:])
        rows.append((seconds, result))
    print(f"Decode {FRAMES} frames of a 640x480 30 fps H.264 clip, median of {args.repeats}, CPU\n")
    print("| clip | transformers s | r1-mm s | speed-up | transformers peak growth MiB | r1-mm peak growth MiB | "
          "r1-mm frames decoded |")
    print("|---|---|---|---|---|---|---|")
    for seconds, r in rows:
        t, o = r["transformers"], r["r1-mm"]
        print(f"| {seconds} s ({seconds * 30} frames) | {t['seconds']:.3f} | {o['seconds']:.3f} | "
              f"{t['seconds'] / o['seconds']:.2f}x | {t['peak_growth_mib']:.0f} | {o['peak_growth_mib']:.0f} | "
              f"{o['frames_decoded']:.0f} |")


if __name__ == "__main__":
    main()
