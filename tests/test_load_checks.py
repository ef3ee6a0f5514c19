"""Issue 19, point 6: every input is checked against every limit when the run loads, for each job that
uses it (train, rollout, tpo build): one line naming the field, row or file, exit code 2, before any
model loads. The premise that no model loaded is made checkable: the fixture replaces every way a
model is loaded (transformers' from_pretrained and r1-mm's loaders) with an AssertionError, so a
check that came after a load fails the test with that error instead of exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

import r1_mm.models.loading
import r1_mm.trainers.backend
from r1_mm.cli import main as cli_main
from r1_mm.config.recipe import load_recipe
from r1_mm.run import input_checks

from .test_bad_inputs import RECIPE

TPO_RECIPE = """
model: {name_or_path: "tiny:qwen2_5_vl:small"}
data: {format_instruction: null}
media: {video_max_pixels: 3136, video_min_pixels: 3136, max_frames: 4}
rollout: {num_generations: 2, max_completion_length: 2}
"""


@pytest.fixture
def no_model_loads(monkeypatch, tiny_cache):
    """Any model load raises; the tiny model's folder (config and processor) stays readable."""
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    loads = []

    def refuse(*args, **kwargs):
        loads.append(args)
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)
    for module in (r1_mm.models.loading, r1_mm.trainers.backend):  # the jobs' load_for_inference calls models.load_model
        monkeypatch.setattr(module, "load_model", refuse)
    return loads


@pytest.fixture
def job(tmp_path, synthetic_data, no_model_loads, capsys):
    """job(command, *overrides, data=..., recipe=...) -> the one error line of `r1-mm COMMAND` (exit 2)."""

    def go(command: str, *overrides: str, data: Path | None = None, recipe: str = RECIPE) -> str:
        data = data or synthetic_data["counting"]
        path = tmp_path / "recipe.yaml"
        path.write_text(recipe)
        args = [str(path), f"data.train_path={data}",
                f"training.output_dir={tmp_path / 'run'}", *overrides]
        argv = {"train": ["train", *args], "rollout": ["rollout", *args],
                "tpo": ["tpo", "build", *args, "--out", str(tmp_path / "pairs.jsonl")],
                "eval": ["eval", *args, f"data.eval_path={data}", "--checkpoint", str(tmp_path / "checkpoint")],
                "dpo": ["dpo", "precompute-ref", *args, "--out", str(tmp_path / "with_ref.jsonl")]}[command]
        code = cli_main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1, err[-2000:]
        assert not no_model_loads
        return lines[0]
    return go


def edited(tmp_path: Path, source: Path, edit, name: str = "rows.jsonl") -> Path:
    """A copy of a synthetic jsonl with absolute media paths, each row passed through ``edit(i, row)``."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    out = []
    for i, row in enumerate(rows):
        for key in ("image", "video"):
            if key in row:
                row[key] = str(source.parent / row[key])
        if "images" in row:
            row["images"] = [str(source.parent / p) for p in row["images"]]
        out.append(json.dumps(edit(i, row)))
    path = tmp_path / name
    path.write_text("\n".join(out) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Numbers and folders (the recipe)


@pytest.mark.parametrize(("override", "expected"), [
    ("training.learning_rate=inf", "training.learning_rate must be a finite number, got inf"),
    ("algorithm.grpo.beta=nan", "algorithm.grpo.beta must be a finite number, got nan"),
    ("training.max_grad_norm=.nan", "training.max_grad_norm must be a finite number, got nan"),
    ("rollout.temperature=-.inf", "rollout.temperature must be a finite number, got -inf"),
    ("rollout.vllm_max_images_per_prompt=-1", "rollout.vllm_max_images_per_prompt must be >= 0, got -1"),
    ("model.lora_dropout=1.0", "model.lora_dropout must be >= 0 and < 1, got 1.0"),
    ("training.output_dir=", "training.output_dir is empty"),
])
def test_numbers_and_output_dir_in_the_recipe(job, override, expected):
    assert expected in job("train", override)


@pytest.mark.parametrize("command", ["train", "rollout"])
def test_unwritable_output_dir(job, tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = job(command, f"training.output_dir={blocker / 'run'}")
    assert f"training.output_dir {blocker / 'run'} cannot be created: {blocker} is a file" in line
    # root can write anywhere permission bits allow, but not into /proc: the check tries, it does not guess
    line = job(command, "training.output_dir=/proc/r1mm-no-run")
    assert line.startswith("error: training.output_dir /proc/r1mm-no-run cannot be written (") and "Traceback" not in line
    assert not Path("/proc/r1mm-no-run").exists()


# ---------------------------------------------------------------------------------------------
# Rows


def test_problem_type_without_a_route(job, tmp_path, synthetic_data):
    data = edited(tmp_path, synthetic_data["counting"],
                  lambda i, r: {**r, "problem_type": "riddle"} if i in (3, 6) else r)
    line = job("train", "rewards.functions=[{name: by_problem_type}]", data=data)
    assert f"{data}: row 3 (id counting-3): problem_type 'riddle' has no reward (1 more row(s); unrouted types: 'riddle')" in line
    assert "add it under the reward's kwargs.routes (rewards.functions[0] (by_problem_type))" in line
    # a route given in the recipe is one
    with pytest.raises(AssertionError, match="a model was loaded"):
        job("train", "rewards.functions=[{name: by_problem_type, kwargs: {routes: {riddle: numeric}}}]", data=data)


@pytest.mark.parametrize("command", ["train", "rollout", "eval", "dpo"])
def test_missing_media_file_under_the_error_policy(job, tmp_path, synthetic_data, command):
    data = edited(tmp_path, synthetic_data["counting"],
                  lambda i, r: {**r, "image": "images/gone.png"} if i >= 4 else r)
    line = job(command, data=data)
    assert (f"{data}: row 4 (id counting-4): media file {tmp_path / 'images' / 'gone.png'} does not exist "
            "(media.on_bad_media=error)") in line and "(3 more row(s) like it)" in line


def test_missing_media_is_left_to_the_skip_policy(tmp_path, synthetic_data):
    data = edited(tmp_path, synthetic_data["counting"], lambda i, r: {**r, "image": "gone.png"} if i == 1 else r)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    cfg = load_recipe(None, [f"data.train_path={data}", "media.on_bad_media=skip"])
    input_checks.check(cfg, rows, str(data), tmp_path)  # the row is skipped (and counted) when drawn
    with pytest.raises(input_checks.DataError, match="row 1 .*gone.png does not exist"):
        input_checks.check(load_recipe(None, [f"data.train_path={data}"]), rows, str(data), tmp_path)


def test_tpo_build_checks_media_before_the_model(job, tmp_path, synthetic_data):
    data = edited(tmp_path, synthetic_data["events"], lambda i, r: {**r, "video": "clips/none.mp4"} if i == 2 else r)
    line = job("tpo", data=data, recipe=TPO_RECIPE)
    assert f"{data}: row 2 (id events-2): media file {tmp_path / 'clips' / 'none.mp4'} does not exist" in line


@pytest.mark.parametrize("command", ["train", "rollout"])
def test_more_images_than_the_vllm_engine_takes(job, synthetic_data, command):
    data = synthetic_data["multi_image"]
    line = job(command, "rollout.engine=vllm_colocate", "rollout.vllm_max_images_per_prompt=1",
               "rewards.functions=[numeric]", data=data)
    assert (f"{data}: row 0 (id multi_image-0): 2 images in one prompt, over rollout.vllm_max_images_per_prompt=1 "
            "(rollout.engine=vllm_colocate, vLLM refuses the prompt)") in line


def test_placeholders_must_match_the_media(job, tmp_path, synthetic_data):
    data = edited(tmp_path, synthetic_data["counting"],
                  lambda i, r: {**r, "prompt": "<image><image> How many squares?"} if i == 5 else r)
    line = job("train", data=data)
    assert (f"{data}: row 5 (id counting-5): prompt has 2 <image> and 0 <video> marks but the row has 1 image(s) "
            "and 0 video(s)") in line


@pytest.mark.parametrize("command", ["train", "rollout"])
def test_text_that_is_not_utf8(job, tmp_path, synthetic_data, command):
    data = edited(tmp_path, synthetic_data["counting"],
                  lambda i, r: {**r, "prompt": "How many squares \ud800?"} if i == 2 else r)
    assert "\\ud800" in data.read_text()  # json.dumps escapes the lone surrogate: the file itself is ASCII
    line = job(command, data=data)
    assert (f"{data}: row 2 (id counting-2): field 'prompt' holds text that is not valid UTF-8 (lone surrogate "
            "'\\ud800' at character 17)") in line
    raw = tmp_path / "bytes.jsonl"
    lines = synthetic_data["counting"].read_bytes().splitlines(keepends=True)
    raw.write_bytes(b"".join(lines[:2]) + lines[2].replace(b"How", b"H\xffow") + b"".join(lines[3:]))
    position = lines[2].index(b"How") + 2  # 1-based, the byte after the H
    assert f"{raw}:3: not valid UTF-8 (byte 0xff at position {position})" in job(command, data=raw)


def test_eval_rows_are_checked_when_the_run_will_evaluate(job, tmp_path, synthetic_data):
    eval_data = edited(tmp_path, synthetic_data["counting"],
                       lambda i, r: {**r, "prompt": "<video> How many?"} if i == 1 else r, name="eval.jsonl")
    line = job("train", f"data.eval_path={eval_data}", "training.eval_steps=1")
    assert f"{eval_data}: row 1 (id counting-1): prompt has 0 <image> and 1 <video> marks" in line


@pytest.mark.parametrize("command", ["train", "rollout", "tpo", "eval", "dpo"])
def test_a_model_family_r1_mm_has_not_verified(job, tmp_path, synthetic_data, command):
    """Every job that runs a model on a vLLM engine refuses a model_type outside models/families before it
    loads (the folder has a config.json only: reading past the config would fail differently); with the
    hf engine the training run checks the cheap contract instead (tests/test_check_model.py)."""
    from transformers import AutoConfig

    folder = tmp_path / ("checkpoint" if command == "eval" else "unverified-model")  # eval reads --checkpoint
    AutoConfig.for_model("mistral", hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64).save_pretrained(folder)
    data = edited(tmp_path, synthetic_data["counting"], lambda i, row: {**row, "chosen": "3", "rejected": "4"})
    line = job(command, f"model.name_or_path={folder}", "training.forward_mode=naive", "rollout.engine=vllm_colocate",
               data=data)
    assert "model_type 'mistral'" in line and "not a family r1-mm has verified" in line, line
    assert "rollout.engine=hf only" in line and f"check-model {folder} --engine vllm_colocate" in line
