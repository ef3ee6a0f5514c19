"""Synthetic image and video tasks with exact ground truth, written as real files.

Why real files: the data pipeline, the media decoder (PIL, PyAV) and the rollout engines must be
exercised exactly as with user data. Each task writes media under ``out_dir`` and a ``.jsonl`` whose
rows follow the documented schema (docs/data.md), with media paths relative to the jsonl's folder.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (240, 220, 30),
    "white": (245, 245, 245), "orange": (250, 140, 20), "purple": (150, 40, 200),
}
BACKGROUND = (0, 0, 0)


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    """Rows as a jsonl file (parents created); the path, for chaining."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def _place_boxes(rng: random.Random, n: int, size: int, box: int, gap: int = 2) -> list[tuple[int, int]]:
    """Top-left corners of ``n`` non-overlapping ``box`` x ``box`` squares on a ``size`` canvas."""
    cells = size // (box + gap)
    slots = [(r, c) for r in range(cells) for c in range(cells)]
    if n > len(slots):
        raise ValueError(f"{n} squares of {box}px do not fit a {size}px image")
    chosen = rng.sample(slots, n)
    return [(c * (box + gap) + gap // 2, r * (box + gap) + gap // 2) for r, c in chosen]


def counting_image(n: int, *, seed: int, size: int = 112, box: int = 16, gap: int = 2,
                   colour: str | None = None) -> Image.Image:
    """An image with exactly ``n`` filled squares (one colour per image) on black.

    Squares sit in a grid of ``box + gap`` cells; with ``box + gap = 28`` each cell is exactly one
    Qwen-VL visual token (the demo's easy setting).
    """
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    rgb = COLOURS[colour or rng.choice(list(COLOURS))]
    for x, y in _place_boxes(rng, n, size, box, gap):
        draw.rectangle([x, y, x + box - 1, y + box - 1], fill=rgb)
    return img


def make_counting_task(out_dir: str | Path, num_rows: int, *, seed: int = 0, min_count: int = 1,
                       max_count: int = 5, size: int = 112, box: int = 16, gap: int = 2,
                       name: str = "counting") -> Path:
    """Counting: "How many squares?" -> solution is the count (problem_type ``counting``)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(num_rows):
        n = rng.randint(min_count, max_count)
        rel = f"images/{name}_{i:05d}.png"
        counting_image(n, seed=rng.randrange(2**31), size=size, box=box, gap=gap).save(out_dir / rel)
        rows.append({"id": f"{name}-{i}", "image": rel, "prompt": "How many squares are in the image?",
                     "solution": str(n), "problem_type": "counting"})
    return write_jsonl(rows, out_dir / f"{name}.jsonl")


@dataclass
class SpatialScene:
    circle_x: int
    square_x: int
    circle_size: int
    square_size: int

    @property
    def left(self) -> str:
        return "circle" if self.circle_x < self.square_x else "square"

    @property
    def nearer(self) -> str:
        """Bigger means nearer: the only depth cue a flat synthetic image has."""
        return "circle" if self.circle_size > self.square_size else "square"


def spatial_image(scene: SpatialScene, size: int = 112) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cy = size // 2
    r = scene.circle_size // 2
    draw.ellipse([scene.circle_x - r, cy - r, scene.circle_x + r, cy + r], fill=COLOURS["red"])
    s = scene.square_size // 2
    draw.rectangle([scene.square_x - s, cy - s, scene.square_x + s, cy + s], fill=COLOURS["blue"])
    return img


def make_spatial_task(out_dir: str | Path, num_rows: int, *, seed: int = 0, size: int = 112,
                      name: str = "spatial") -> Path:
    """Two objects: which is on the left / which is nearer (multiple choice, problem_type ``mcq``)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(num_rows):
        sizes = rng.sample([12, 18, 26, 34], 2)
        xs = [size // 4, 3 * size // 4]
        rng.shuffle(xs)
        scene = SpatialScene(circle_x=xs[0], square_x=xs[1], circle_size=sizes[0], square_size=sizes[1])
        rel = f"images/{name}_{i:05d}.png"
        spatial_image(scene, size).save(out_dir / rel)
        question = rng.choice(["left", "nearer"])
        answer = scene.left if question == "left" else scene.nearer
        text = ("Which object is on the left?" if question == "left"
                else "Which object is nearer to the camera?")
        rows.append({"id": f"{name}-{i}", "image": rel, "prompt": text, "options": ["A. circle", "B. square"],
                     "solution": "A" if answer == "circle" else "B", "problem_type": "mcq"})
    return write_jsonl(rows, out_dir / f"{name}.jsonl")


def write_mp4(frames: Iterable[np.ndarray], path: str | Path, fps: int, *, keyframe_interval: int | None = None) -> Path:
    """Encode uint8 (H, W, 3) frames (an array or any iterable, consumed one at a time, so long clips
    never sit in memory) to an H.264 mp4 with PyAV (even sides required)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = None
        for arr in frames:
            if stream is None:
                stream = container.add_stream("libx264", rate=fps)
                stream.width, stream.height = int(arr.shape[1]), int(arr.shape[0])
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": "18", "preset": "ultrafast",
                                  **({"g": str(keyframe_interval)} if keyframe_interval else {})}
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError("no frames to encode")
        for packet in stream.encode():
            container.mux(packet)
    return path


def clock_frames(duration_s: float, fps: int, *, height: int = 240, width: int = 320) -> Iterator[np.ndarray]:
    """Frames that show their own index (a 12-bit pattern of 16x16 blocks on a moving gradient):
    a decoder test can tell exactly which frame it got. Generated lazily, for clips of any length."""
    xs = np.arange(width, dtype=np.int32)[None, :]
    ys = np.arange(height, dtype=np.int32)[:, None]
    for i in range(int(round(duration_s * fps))):
        base = ((xs + ys + 3 * i) % 200).astype(np.uint8)
        frame = np.repeat(base[:, :, None], 3, axis=2)
        for bit in range(12):
            y, x = 16 * (bit // 6), 16 * (bit % 6)
            frame[y:y + 16, x:x + 16] = 255 if (i >> bit) & 1 else 0
        yield frame


def clock_index(frame: np.ndarray) -> int:
    """The index :func:`clock_frames` drew into a (decoded, so slightly lossy) frame."""
    return sum(1 << bit for bit in range(12) if frame[16 * (bit // 6) + 8, 16 * (bit % 6) + 8].mean() > 127)


def event_video(duration_s: float, fps: int, start_s: float, end_s: float, *, colour: str = "red",
                size: int = 112, box: int = 32) -> np.ndarray:
    """Frames of a black scene where a square is visible exactly during [start_s, end_s)."""
    n = int(round(duration_s * fps))
    frames = np.zeros((n, size, size, 3), dtype=np.uint8)
    lo = size // 2 - box // 2
    for i in range(n):
        t = i / fps
        if start_s <= t < end_s:
            frames[i, lo:lo + box, lo:lo + box] = COLOURS[colour]
    return frames


def make_event_video_task(out_dir: str | Path, num_rows: int, *, seed: int = 0, duration_s: float = 8.0,
                          fps: int = 4, size: int = 112, name: str = "events") -> Path:
    """Videos where a square appears during a known segment.

    Two question kinds: ``temporal`` (when does it appear? solution "[start, end]" in seconds) and
    ``mcq`` about the square's colour, which only the event segment can answer (the localized
    questions TPO builds preference pairs from). Every row carries ``segment: [start, end]``.
    """
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    rows = []
    colours = list(COLOURS)
    for i in range(num_rows):
        length = rng.choice([1.0, 1.5, 2.0])
        start = round(rng.uniform(0.5, duration_s - length - 0.5) * 2) / 2
        end = start + length
        colour = rng.choice(colours)
        rel = f"videos/{name}_{i:05d}.mp4"
        write_mp4(event_video(duration_s, fps, start, end, colour=colour, size=size), out_dir / rel, fps)
        row = {"id": f"{name}-{i}", "video": rel, "segment": [start, end]}
        if i % 2 == 0:
            row.update(prompt="When does the square appear in the video? Answer with [start, end] in seconds.",
                       solution=f"[{start}, {end}]", problem_type="temporal")
        else:
            options = [colour] + rng.sample([c for c in colours if c != colour], 3)
            rng.shuffle(options)
            letters = "ABCD"
            row.update(prompt="What colour is the square that appears in the video?",
                       options=[f"{letters[j]}. {c}" for j, c in enumerate(options)],
                       solution=letters[options.index(colour)], problem_type="mcq")
        rows.append(row)
    return write_jsonl(rows, out_dir / f"{name}.jsonl")


def make_multi_image_task(out_dir: str | Path, num_rows: int, *, seed: int = 0, size: int = 56,
                          name: str = "multi_image") -> Path:
    """Two counting images per row: how many squares in both together? (problem_type ``counting``)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(num_rows):
        counts = [rng.randint(1, 3), rng.randint(1, 3)]
        rels = []
        for j, n in enumerate(counts):
            rel = f"images/{name}_{i:05d}_{j}.png"
            counting_image(n, seed=rng.randrange(2**31), size=size, box=12).save(out_dir / rel)
            rels.append(rel)
        rows.append({"id": f"{name}-{i}", "images": rels,
                     "prompt": "How many squares are there in the two images together?",
                     "solution": str(sum(counts)), "problem_type": "counting"})
    return write_jsonl(rows, out_dir / f"{name}.jsonl")


CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def corner_box(corner: str, size: int, region: int) -> list[int]:
    """[x1, y1, x2, y2] of the ``region`` x ``region`` square in ``corner`` of a ``size`` x ``size`` image."""
    x = 0 if corner.endswith("left") else size - region
    y = 0 if corner.startswith("top") else size - region
    return [x, y, x + region, y + region]


def zoom_image(n: int, corner: str, *, seed: int, size: int = 448, region: int = 112, box: int = 16,
               gap: int = 2) -> Image.Image:
    """A large image with exactly ``n`` squares, all inside the ``region`` square at ``corner`` (a counting image
    of that size pasted there) and faint clutter elsewhere. At a prompt budget that shows the whole image at
    ``region`` pixels the squares shrink by size / region and the whole detail falls into one visual token; a crop
    of the corner shows it at full resolution."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for _ in range(size // 8):  # clutter: dim dots that are not squares to count
        x, y = rng.randrange(size), rng.randrange(size)
        draw.point((x, y), fill=(40, 40, 40))
    x1, y1, _, _ = corner_box(corner, size, region)
    img.paste(counting_image(n, seed=rng.randrange(2**31), size=region, box=box, gap=gap), (x1, y1))
    return img


def crop_call(box: list[int]) -> str:
    """A crop_image call in the Hermes format of Qwen's chat templates."""
    return '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": ' + str(list(box)) + "}}\n</tool_call>"


def make_zoom_sft_task(zoom_rows: str | Path, num_rows: int, *, shown: int, seed: int = 0,
                       call_fraction: float = 0.5, answers: str = "random", min_count: int = 1, max_count: int = 4,
                       name: str = "zoom_sft") -> Path:
    """SFT rows that teach the call format and nothing else (issue 23's warm start): the first ``num_rows`` rows
    of a :func:`make_zoom_task` file, a ``call_fraction`` of them with ``turns`` = [a crop_image call on the row's
    region in the coordinates of the image as shown (``shown`` px square, crop_image's default), an answer], the
    others one answer turn. ``answers``: ``random`` counts (the call format alone is taught, counting is left for
    GRPO) or the ``solution``."""
    from r1_mm.data.loading import read_rows

    zoom_rows = Path(zoom_rows)
    rng = random.Random(seed)
    rows = []
    for row in read_rows(zoom_rows)[:num_rows]:
        size = Image.open(zoom_rows.parent / row["image"]).width
        count = row["solution"] if answers == "solution" else rng.randint(min_count, max_count)
        answer = f"<answer>{count}</answer>"
        if rng.random() < call_fraction:
            box = [round(v * shown / size) for v in row["region"]]
            turns = [crop_call(box), answer]
        else:
            turns = [answer]
        rows.append({**row, "id": f"{name}-{row['id']}", "turns": turns})
    return write_jsonl(rows, zoom_rows.parent / f"{name}.jsonl")


def make_zoom_crop_task(zoom_rows: str | Path, num_rows: int, *, name: str = "zoom_crops") -> Path:
    """Counting rows on the crops a right crop_image call returns (each zoom row's ``region`` cut from its image, at
    full resolution), with the same question and ``turns`` = [the answer]: SFT rows that teach counting on what the
    tool shows, which calling alone does not (the counting demo's SFT cold start learns that count in ~100 steps;
    the zoom rows' one answer digit after a ~20-token call barely moves the loss)."""
    from r1_mm.data.loading import read_rows

    zoom_rows = Path(zoom_rows)
    (zoom_rows.parent / "crops").mkdir(parents=True, exist_ok=True)
    rows = []
    for row in read_rows(zoom_rows)[:num_rows]:
        rel = f"crops/{Path(row['image']).stem}.png"
        Image.open(zoom_rows.parent / row["image"]).crop(tuple(row["region"])).save(zoom_rows.parent / rel)
        rows.append({**row, "id": f"{name}-{row['id']}", "image": rel, "turns": [f"<answer>{row['solution']}</answer>"]})
    return write_jsonl(rows, zoom_rows.parent / f"{name}.jsonl")


def make_zoom_task(out_dir: str | Path, num_rows: int, *, seed: int = 0, size: int = 448, region: int = 112,
                   corners: tuple[str, ...] = CORNERS, min_count: int = 1, max_count: int = 5,
                   box: int = 16, gap: int = 2, name: str = "zoom") -> Path:
    """Counting that needs a zoom (issue 23's demo task): "How many squares are in the <corner> corner?" on a
    ``size`` image whose squares all lie in the ``region`` square at that corner; ``region`` (the row's column,
    original pixels) is where a right crop_image call looks. problem_type ``counting``."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(num_rows):
        n, corner = rng.randint(min_count, max_count), rng.choice(corners)
        rel = f"images/{name}_{i:05d}.png"
        zoom_image(n, corner, seed=rng.randrange(2**31), size=size, region=region, box=box, gap=gap).save(out_dir / rel)
        rows.append({"id": f"{name}-{i}", "image": rel, "prompt": f"How many squares are in the {corner} corner?",
                     "solution": str(n), "problem_type": "counting", "region": corner_box(corner, size, region)})
    return write_jsonl(rows, out_dir / f"{name}.jsonl")
