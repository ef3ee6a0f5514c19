"""The synthetic tasks' ground truth is checked from the written files' pixels, not from the generator."""

import json

import numpy as np
from PIL import Image

from r1_mm.config.recipe import MediaConfig
from r1_mm.data.media import load_video


def count_blobs(mask: np.ndarray) -> int:
    """Connected components (4-neighbour) of a boolean mask."""
    seen = np.zeros_like(mask, dtype=bool)
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        while stack:
            cy, cx = stack.pop()
            if not (0 <= cy < mask.shape[0] and 0 <= cx < mask.shape[1]) or seen[cy, cx] or not mask[cy, cx]:
                continue
            seen[cy, cx] = True
            stack += [(cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)]
    return count


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_counting_images_hold_the_stated_number_of_squares(synthetic_data):
    path = synthetic_data["counting"]
    for row in rows(path):
        img = np.asarray(Image.open(path.parent / row["image"]))
        assert count_blobs(img.sum(-1) > 60) == int(row["solution"])
        assert row["problem_type"] == "counting"


def test_multi_image_rows_sum_counts(synthetic_data):
    path = synthetic_data["multi_image"]
    for row in rows(path):
        total = sum(count_blobs(np.asarray(Image.open(path.parent / p)).sum(-1) > 60) for p in row["images"])
        assert total == int(row["solution"])


def test_spatial_answers_match_pixels(synthetic_data):
    path = synthetic_data["spatial"]
    for row in rows(path):
        img = np.asarray(Image.open(path.parent / row["image"])).astype(int)
        red = (img[..., 0] > 150) & (img[..., 2] < 100)  # circle
        blue = (img[..., 2] > 150) & (img[..., 0] < 100)  # square
        circle_x, square_x = np.nonzero(red)[1].mean(), np.nonzero(blue)[1].mean()
        if "left" in row["prompt"]:
            truth = "circle" if circle_x < square_x else "square"
        else:
            truth = "circle" if red.sum() > blue.sum() else "square"
        assert row["solution"] == ("A" if truth == "circle" else "B")
        assert row["problem_type"] == "mcq" and row["options"] == ["A. circle", "B. square"]


def test_event_videos_show_the_square_exactly_in_the_segment(synthetic_data):
    path = synthetic_data["events"]
    cfg = MediaConfig(nframes=None, fps=4.0, max_frames=64, video_total_pixels=10**9, video_max_pixels=112 * 112)
    for row in rows(path):
        video = load_video(row["video"], cfg, factor=28, root=path.parent)
        start, end = row["segment"]
        visible = [t for t, f in zip(video.timestamps, video.frames) if f[50:62, 50:62].mean() > 40]
        assert visible and abs(min(visible) - start) < 0.26 and abs(max(visible) + 0.25 - end) < 0.26
        if row["problem_type"] == "temporal":
            assert json.loads(row["solution"]) == [start, end]
        else:
            assert row["problem_type"] == "mcq" and row["solution"] in "ABCD"
