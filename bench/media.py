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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from grpo_step import run_workers  # noqa: E402

FRAMES = 16
LENGTHS_S = (15, 30, 60)


def worker(loader: str, path: str, repeats: int) -> dict:
    import numpy as np
    from transformers.video_utils import load_video

    from r1_mm.config.recipe import MediaConfig
    from r1_mm.core.memory import peak_rss_bytes
    from r1_mm.data import media

    cfg = MediaConfig(nframes=FRAMES, video_max_pixels=640 * 480, video_total_pixels=10**10)

    def decode() -> np.ndarray:
        if loader == "r1-mm":
            return media.load_video(path, cfg, factor=2).frames  # factor 2: no resize, the raw decode is timed
        return np.asarray(load_video(path, num_frames=FRAMES, backend="pyav")[0])

    before = peak_rss_bytes()
    decode()  # warm-up: lazy imports and first-call setup stay out of the timing (not of the memory)
    media.DECODE_STATS.clear()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        frames = decode()
        times.append(time.perf_counter() - t0)
        assert frames.shape[0] == FRAMES
    grown = peak_rss_bytes() - before
    out = {"loader": loader, "seconds": sorted(times)[len(times) // 2], "peak_growth_mib": grown / 2**20}
    if loader == "r1-mm":
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
        done = run_workers(__file__, [(loader, str(clip)) for loader in ("transformers", "r1-mm")], args.repeats)
        rows.append((seconds, {loader: r for (loader, _), r in done.items()}))
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
