"""Videos: only the sampled frames are decoded and kept (indices from the stream's metadata, seeking
over long gaps), they are the frames a full decode samples, and memory does not grow with length."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from r1_mm.config.recipe import MediaConfig
from r1_mm.data import media
from r1_mm.data.media import choose_frame_count, load_video, sample_indices
from r1_mm.testing.synthetic import clock_frames, clock_index, write_mp4


def decode_everything(path) -> tuple[list[np.ndarray], float]:
    """The reference: every frame decoded (what r1-mm did before, and what a naive loader does)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], fps


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return {
        "short_4fps": write_mp4(clock_frames(8, 4, height=112, width=112), root / "short.mp4", 4),
        "long_30fps": write_mp4(clock_frames(60, 30), root / "long.mp4", 30),  # 1,800 frames, default GOP 250
        "long_small_gop": write_mp4(clock_frames(40, 25), root / "gop.mp4", 25, keyframe_interval=12),
    }


@pytest.mark.parametrize("name", ["short_4fps", "long_30fps", "long_small_gop"])
@pytest.mark.parametrize("frames", [None, 16, 6])
def test_sampled_frames_are_the_full_decodes(clips, name, frames):
    cfg = MediaConfig(nframes=frames, fps=2.0, max_frames=32, video_max_pixels=10**9, video_total_pixels=10**10)
    before = dict(media.DECODE_STATS)
    video = load_video(str(clips[name]), cfg, factor=28)
    decoded = media.DECODE_STATS["frames_decoded"] - before.get("frames_decoded", 0)
    seeks = media.DECODE_STATS["seeks"] - before.get("seeks", 0)
    everything, fps = decode_everything(clips[name])
    idx = sample_indices(len(everything), choose_frame_count(len(everything), fps, cfg))
    assert video.source_indices == idx
    assert [clock_index(f) for f in video.frames] == idx  # the frames show their own indices
    h, w = video.frames.shape[1:3]
    if (h, w) == everything[0].shape[:2]:  # no resize: pixel-identical to the full decode's frames
        assert all(np.array_equal(video.frames[k], everything[i]) for k, i in enumerate(idx))
    assert video.duration == pytest.approx(len(everything) / fps)
    gaps = [b - a for a, b in zip(idx, idx[1:], strict=False)]
    if name == "long_small_gop" and min(gaps) > 12:  # keyframes every 12 frames: seeking skips most of the clip
        assert seeks > 0 and decoded < len(everything) / 2, (seeks, decoded)
    assert decoded <= idx[-1] + 1  # never more than one pass up to the last kept frame
    if name == "short_4fps":  # one keyframe (GOP 250): no seek possible, one pass that stops at the last kept frame
        assert seeks == 0 and decoded == idx[-1] + 1


MEMORY = """
import json, sys
from r1_mm.core.memory import peak_rss_bytes
from r1_mm.config.recipe import MediaConfig
from r1_mm.data.media import load_video
cfg = MediaConfig(nframes=16, video_max_pixels=320 * 240, video_total_pixels=10**9)
load_video(sys.argv[1], cfg, factor=28)  # warm-up: imports, codec and allocator set-up are not the video's
before = peak_rss_bytes()
if sys.argv[3] == "sampled":
    video = load_video(sys.argv[2], cfg, factor=28)
    kept, seconds = video.num_frames, video.duration
else:  # the naive loader: proves the measure sees what keeping every frame costs
    import av
    with av.open(sys.argv[2]) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    kept, seconds = len(frames), None
print(json.dumps({"grown": peak_rss_bytes() - before, "frames": kept, "seconds": seconds}))
"""


def test_memory_does_not_grow_with_video_length(clips, tmp_path):
    """16 frames of a 60 s 320x240 clip: all 1,800 decoded frames would be 415 MB."""
    grown = {}
    for name, mode in (("short_4fps", "sampled"), ("long_30fps", "sampled"), ("long_30fps", "everything")):
        proc = subprocess.run([sys.executable, "-c", MEMORY, str(clips["short_4fps"]), str(clips[name]), mode],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        grown[f"{name}/{mode}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    all_frames = 1800 * 240 * 320 * 3
    assert grown["long_30fps/everything"]["grown"] > all_frames / 2, grown  # the premise: the measure sees frames
    long, short = grown["long_30fps/sampled"], grown["short_4fps/sampled"]
    assert long["seconds"] == pytest.approx(60.0) and long["frames"] == 16
    kept = 16 * 240 * 320 * 3  # what the sampled frames themselves hold (3.7 MB)
    assert long["grown"] < kept + all_frames / 16, grown  # decoder buffers, not the clip
    assert long["grown"] - short["grown"] < all_frames / 16, grown  # bounded, not per second
