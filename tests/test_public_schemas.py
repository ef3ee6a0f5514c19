"""Public datasets load as they are published: VSI-Bench (parquet, videos named by fields), Video-R1
(json with path + data_type), CLEVR as R1-V uses it (a datasets Image column) and a ``Dataset``
object, through ``datasets.load_dataset`` sources, ``data.columns`` and ``data.media_template``.
The rows here are synthetic, built in each dataset's published schema; the media are real files."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from r1_mm.config.recipe import load_recipe
from r1_mm.data import PromptStream
from r1_mm.data.loading import DataError, load_split
from r1_mm.models.loading import load_processor
from r1_mm.testing.synthetic import clock_frames, write_mp4
from r1_mm.trainers.grpo import GRPOTrainer

VSI_ROUTES = "{object_counting: mra, object_abs_distance: mra, object_rel_distance: mcq}"


@pytest.fixture(autouse=True)
def _cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))


def base(tmp_path: Path, *overrides: str):
    return load_recipe(None, [
        "model.name_or_path=tiny:qwen2_5_vl:small", f"training.output_dir={tmp_path / 'run'}",
        "data.format_instruction=null", "media.max_pixels=3136", "media.min_pixels=3136", "media.max_frames=4",
        "media.video_max_pixels=3136", "rollout.num_generations=2", "rollout.max_completion_length=3",
        "training.prompts_per_step=2", "training.max_steps=1", "logging.progress_bar=false", *overrides])


@pytest.fixture(scope="module")
def vsi_bench(tmp_path_factory) -> Path:
    """VSI-Bench's test split: id, dataset, scene_name, question_type, question, ground_truth, options;
    videos in <dataset>/<scene_name>.mp4 (the archives arkitscenes.zip, scannet.zip, scannetpp.zip)."""
    root = tmp_path_factory.mktemp("vsi_bench")
    for dataset, scene in (("scannet", "scene0011_00"), ("arkitscenes", "41069025")):
        write_mp4(clock_frames(2, 4, height=112, width=112), root / dataset / f"{scene}.mp4", 4)
    rows = [
        {"id": 1, "dataset": "scannet", "scene_name": "scene0011_00", "question_type": "object_counting",
         "question": "How many chair(s) are in this room?", "ground_truth": "4", "options": None},
        {"id": 2, "dataset": "arkitscenes", "scene_name": "41069025", "question_type": "object_rel_distance",
         "question": "Which of these objects is the closest to the sofa?", "ground_truth": "B",
         "options": ["A. table", "B. lamp", "C. bed", "D. tv"]},
        {"id": 3, "dataset": "scannet", "scene_name": "scene0011_00", "question_type": "object_abs_distance",
         "question": "Measuring from the closest point of each object, what is the distance between the bed and "
                     "the door (in meters)?", "ground_truth": "2.3", "options": None},
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(root / "test-00000-of-00001.parquet"))
    return root


VSI_MAPPING = ["data.columns={ground_truth: solution, question_type: problem_type}",
               "data.media_template={video: '{dataset}/{scene_name}.mp4'}"]


def test_vsi_bench_loads_through_load_dataset_with_mapping_and_trains(tmp_path, vsi_bench):
    cfg = base(tmp_path, "data.dataset_name=parquet",
               f"data.data_files={{test: '{vsi_bench / 'test-00000-of-00001.parquet'}'}}", "data.train_split=test",
               f"data.media_root={vsi_bench}", *VSI_MAPPING,
               f"rewards.functions=[{{name: by_problem_type, kwargs: {{routes: {VSI_ROUTES}}}}}]")
    rows, source, _ = load_split(cfg.data)
    assert source == "parquet[test]" and len(rows) == 3
    assert rows[1]["solution"] == "B" and rows[1]["problem_type"] == "object_rel_distance"
    assert rows[1]["video"] == "arkitscenes/41069025.mp4" and "ground_truth" not in rows[1]
    stream = PromptStream.from_config(load_processor(cfg.model), cfg.data, cfg.media)
    sample = stream.prepare(1)
    assert sample.videos and sample.videos[0].frames.shape[0] == 4  # the real mp4, found from the row's fields
    assert "B. lamp" in sample.prompt_text  # options appended to the question
    trainer = GRPOTrainer(cfg)
    trainer.train()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/by_problem_type/mean" in metrics[0] and metrics[0]["data/skipped_bad_media"] == 0


def test_a_downloaded_dataset_folder_is_a_load_dataset_source_and_media_root(tmp_path, vsi_bench):
    """A hub snapshot on disk (parquet files beside the media) loads by its folder, media found there."""
    cfg = base(tmp_path, f"data.dataset_name={vsi_bench}", "data.train_split=test", *VSI_MAPPING)  # split from the file name
    rows, _, root = load_split(cfg.data)
    assert len(rows) == 3 and root == vsi_bench.resolve()
    stream = PromptStream.from_config(load_processor(cfg.model), cfg.data, cfg.media)
    assert stream.prepare(0).videos[0].frames.shape[0] == 4


def test_mapping_errors_name_the_row_and_field(tmp_path, vsi_bench):
    parquet = vsi_bench / "test-00000-of-00001.parquet"
    cfg = base(tmp_path, f"data.train_path={parquet}", "data.media_template={video: '{dataset}/{scene}.mp4'}")
    with pytest.raises(DataError, match=r"row 0 \(id 1\): data.media_template.video '\{dataset\}/\{scene\}.mp4' "
                                        r"needs the field 'scene'"):
        load_split(cfg.data)
    cfg = base(tmp_path, f"data.train_path={parquet}", "data.columns={ground_truth: question}")
    with pytest.raises(DataError, match="maps 'ground_truth' to 'question', but the row already has a 'question'"):
        load_split(cfg.data)
    cfg = base(tmp_path, "data.dataset_name=parquet", f"data.data_files={parquet}", "data.train_split=validation")
    with pytest.raises(DataError, match=r"data.dataset_name 'parquet' \(split 'validation'\)"):
        load_split(cfg.data)


def test_video_r1_rows_load_as_published(tmp_path):
    """Video-R1-260k (json): problem_id, problem, data_type, problem_type, options, process, solution,
    path, data_source; media by path + data_type, answers inside <answer> tags."""
    write_mp4(clock_frames(2, 4, height=112, width=112), tmp_path / "LLaVA-Video-178K" / "clip.mp4", 4)
    Image.fromarray(np.full((56, 56, 3), 200, np.uint8)).save(tmp_path / "chart.png")
    rows = [
        {"problem_id": 1, "problem": "What happens first?", "data_type": "video", "problem_type": "multiple choice",
         "options": ["A. a cat runs", "B. a dog sits"], "process": "<think>...</think>",
         "solution": "<answer>A</answer>", "path": "./LLaVA-Video-178K/clip.mp4", "data_source": "LLaVA-Video-178K"},
        {"problem_id": 2, "problem": "What is the value?", "data_type": "image", "problem_type": "numerical",
         "options": [], "process": "", "solution": "<answer>3.5</answer>", "path": "./chart.png",
         "data_source": "ChartQA"},
    ]
    (tmp_path / "Video-R1-260k.json").write_text(json.dumps(rows))
    cfg = base(tmp_path, f"data.train_path={tmp_path / 'Video-R1-260k.json'}",
               "rewards.functions=[{name: by_problem_type, kwargs: {routes: {multiple choice: mcq, numerical: numeric}}}]")
    stream = PromptStream.from_config(load_processor(cfg.model), cfg.data, cfg.media)
    video, image = stream.prepare(0), stream.prepare(1)
    assert video.videos and not video.images and image.images and not image.videos
    GRPOTrainer(cfg).train()


def test_clevr_with_an_image_column_and_a_dataset_object(tmp_path):
    """CLEVR as R1-V trains on it (clevr_cogen_a_train): image (a datasets Image), problem, solution
    "<answer> 3 </answer>"; saved with save_to_disk, and given as a Dataset object."""
    images = [Image.fromarray(np.full((56, 56, 3), 40 * i, np.uint8)) for i in range(1, 3)]
    ds = datasets.Dataset.from_dict(
        {"image": images, "problem": ["How many items are there in the image?"] * 2,
         "solution": ["<answer> 3 </answer>", "<answer> 5 </answer>"]},
        features=datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                                    "solution": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "clevr"))
    cfg = base(tmp_path, f"data.train_path={tmp_path / 'clevr'}", "rewards.functions=[{name: numeric}]")
    processor = load_processor(cfg.model)
    from_disk = PromptStream.from_config(processor, cfg.data, cfg.media)
    as_object = PromptStream.from_config(processor, cfg.data, cfg.media, dataset=ds)
    a, b = from_disk.prepare(1), as_object.prepare(1)
    assert a.images and np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert a.prompt_text == b.prompt_text and as_object.source == "<Dataset of train>"
    GRPOTrainer(cfg).train()
