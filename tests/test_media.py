import io

import numpy as np
import pytest
from PIL import Image

from r1_mm.config.recipe import MediaConfig
from r1_mm.config.visual_budget import video_tokens
from r1_mm.data.media import (
    MediaError,
    choose_frame_count,
    fit_to_budget,
    load_image,
    load_video,
    open_image,
    sample_indices,
)
from r1_mm.testing.synthetic import clock_frames, event_video, write_mp4

FACTOR = 28


def rgb(h, w, value=128):
    return Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8))


@pytest.mark.parametrize("h,w", [(100, 100), (28, 700), (1000, 333), (15, 15), (3000, 4000)])
def test_fit_to_budget_respects_factor_and_limits(h, w):
    lo, hi = 28 * 28 * 4, 28 * 28 * 64
    nh, nw = fit_to_budget(h, w, factor=FACTOR, min_pixels=lo, max_pixels=hi)
    assert nh % FACTOR == 0 and nw % FACTOR == 0
    assert lo <= nh * nw <= hi
    assert abs(nh / nw - h / w) / (h / w) < 0.6  # aspect ratio kept as far as rounding allows


def test_aligned_image_within_budget_is_untouched():
    img = rgb(112, 84)
    out = load_image(img, MediaConfig(min_pixels=28 * 28, max_pixels=28 * 28 * 100), factor=FACTOR)
    assert out.size == (84, 112)


def test_image_sources_path_pil_bytes_dict(tmp_path):
    img = rgb(56, 56, 200)
    path = tmp_path / "a.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    cfg = MediaConfig()
    for ref in [str(path), "a.png", img, buf.getvalue(), {"bytes": buf.getvalue()}, {"path": str(path)}]:
        out = load_image(ref, cfg, factor=FACTOR, root=tmp_path)
        assert out.mode == "RGB" and np.asarray(out)[0, 0, 0] == 200


def test_max_pixels_per_image_applies():
    out = load_image(rgb(560, 560), MediaConfig(min_pixels=28 * 28, max_pixels=28 * 28 * 4), factor=FACTOR)
    assert out.size == (56, 56)


def test_missing_and_corrupt_image_errors_name_row_and_file(tmp_path):
    with pytest.raises(MediaError, match=r"row r7: cannot load media '.*nope.png': file not found"):
        open_image("nope.png", root=tmp_path, row="r7")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(MediaError, match=r"row 3: cannot load media '.*bad.png': UnidentifiedImageError"):
        open_image(str(bad), row=3)


def test_frame_count_by_nframes_and_by_fps():
    assert choose_frame_count(100, 10.0, MediaConfig(nframes=8)) == 8
    assert choose_frame_count(100, 10.0, MediaConfig(nframes=7)) == 6  # multiple of the temporal patch
    # 10 s at fps=2 -> 20, capped by max_frames
    assert choose_frame_count(100, 10.0, MediaConfig(fps=2.0, min_frames=4, max_frames=16)) == 16
    assert choose_frame_count(100, 10.0, MediaConfig(fps=1.0, min_frames=4, max_frames=16)) == 10
    # a 1 s video at fps=1 -> raised to min_frames
    assert choose_frame_count(10, 10.0, MediaConfig(fps=1.0, min_frames=4, max_frames=16)) == 4
    # never more frames than the video has (but at least one temporal patch)
    assert choose_frame_count(3, 10.0, MediaConfig(fps=1.0, min_frames=8, max_frames=16)) == 2
    assert sample_indices(10, 4) == [0, 3, 6, 9]


@pytest.fixture
def mp4(tmp_path):
    frames = event_video(4.0, 8, 1.0, 2.0, colour="red", size=112)
    return write_mp4(frames, tmp_path / "v.mp4", fps=8), frames


def test_mp4_decoding_sampling_and_timestamps(mp4):
    path, _ = mp4
    cfg = MediaConfig(fps=2.0, min_frames=2, max_frames=32, video_total_pixels=10**9,
                      video_max_pixels=112 * 112)
    video = load_video(str(path), cfg, factor=FACTOR)
    assert video.num_frames == 8 and video.source_fps == pytest.approx(8.0)
    assert video.duration == pytest.approx(4.0)
    assert video.sample_fps == pytest.approx(2.0)
    assert video.frames.shape == (8, 112, 112, 3)
    # the event (red square, 1 s to 2 s) is visible exactly in frames whose timestamp is inside it
    for t, frame in zip(video.timestamps, video.frames):
        red = frame[56, 56, 0] > 150 and frame[56, 56, 2] < 100
        assert red == (1.0 <= t < 2.0), t
    meta = video.metadata()
    assert meta["total_num_frames"] == 32 and len(meta["frames_indices"]) == 8


def test_video_total_pixel_budget_alone_spreads_over_the_frames(mp4):
    path, _ = mp4
    cfg = MediaConfig(nframes=8, video_min_pixels=28 * 28, video_total_pixels=8 * 56 * 56)
    video = load_video(str(path), cfg, factor=FACTOR)
    assert video.frames.shape == (8, 56, 56, 3)
    fewer = load_video(str(path), MediaConfig(nframes=2, video_min_pixels=28 * 28, video_total_pixels=8 * 56 * 56),
                       factor=FACTOR)
    assert fewer.frames.shape == (2, 112, 112, 3)  # a shorter sampling gets larger frames (here: the full 112x112)


def test_a_stated_per_frame_budget_is_what_every_frame_gets(tmp_path):
    """vsGRPO's recipe states 200,704 pixels per frame and no whole-video budget: all 16 frames of a
    640x480 video get 364x504 (234 tokens), not a default whole-video budget's 16-token thumbnails."""
    from r1_mm.config.recipe import load_recipe

    path = write_mp4(clock_frames(20.0, 2, height=480, width=640), tmp_path / "vga.mp4", fps=2)
    cfg = load_recipe(None, ["media.video_max_pixels=200704", "media.fps=1.0", "media.max_frames=16"]).media
    video = load_video(str(path), cfg, factor=FACTOR)
    assert video.frames.shape == (16, 364, 504, 3)
    assert video_tokens(16, 364, 504, factor=FACTOR, frame_factor=2).describe() == (
        "16 frames of 364x504 pixels = 8 temporal patches (2 frames each) x 234 tokens per frame = 1872 visual tokens")


def test_conflicting_video_budgets_stop_at_load_naming_both_fields():
    from r1_mm.config.recipe import ConfigError, load_recipe

    with pytest.raises(ConfigError) as err:
        load_recipe(None, ["media.video_max_pixels=200704", "media.video_total_pixels=200704", "media.max_frames=16"])
    line = str(err.value)
    assert "\n" not in line and "media.video_total_pixels=200704" in line and "media.video_max_pixels=200704" in line
    assert "16 frames (media.max_frames)" in line
    with pytest.raises(ConfigError, match=r"media\.nframes\) x media\.video_max_pixels"):
        load_recipe(None, ["media.video_max_pixels=3136", "media.video_total_pixels=3136", "media.nframes=4"])
    # budgets that agree load: 16 frames x 200704 fit in 16 x 200704
    assert load_recipe(None, ["media.video_max_pixels=200704", "media.video_total_pixels=3211264"]).media.video_total_pixels


def test_video_from_folder_and_frame_list(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(6):
        rgb(56, 56, i * 40).save(folder / f"{i:03d}.png")
    cfg = MediaConfig(nframes=4, video_total_pixels=10**9)
    from_folder = load_video(str(folder), cfg, factor=FACTOR, frames_fps=3.0)
    assert from_folder.num_frames == 4 and from_folder.source_fps == 3.0
    assert [int(f[0, 0, 0]) for f in from_folder.frames] == [0, 80, 120, 200]
    from_list = load_video([str(p) for p in sorted(folder.iterdir())], cfg, factor=FACTOR, frames_fps=3.0)
    assert np.array_equal(from_list.frames, from_folder.frames)
    from_array = load_video(np.stack([np.asarray(rgb(56, 56, i)) for i in range(6)]), cfg, factor=FACTOR)
    assert from_array.num_frames == 4


def test_bad_videos_name_row_and_file(tmp_path):
    cfg = MediaConfig()
    with pytest.raises(MediaError, match=r"row v1: cannot load media '.*missing.mp4': file not found"):
        load_video("missing.mp4", cfg, factor=FACTOR, root=tmp_path, row="v1")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    with pytest.raises(MediaError, match=r"row v2: cannot load media '.*corrupt.mp4'"):
        load_video(str(corrupt), cfg, factor=FACTOR, row="v2")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MediaError, match="folder holds no image frames"):
        load_video(str(empty), cfg, factor=FACTOR, row="v3")
