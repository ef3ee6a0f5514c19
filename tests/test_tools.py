"""Tool plugins without a model: registration and lookup like rewards, the Hermes call parser on a table of
well- and ill-formed calls, argument checks against the schema, the built-in crop and video tools on real
images and a real mp4 (decoded by PyAV), and the executor turning every failure into a counted error text
while running calls concurrently under a per-call deadline."""

from __future__ import annotations

import textwrap
import threading
import time

import numpy as np
import pytest
from PIL import Image

from r1_mm.testing.synthetic import clock_frames, clock_index, write_mp4
from r1_mm.tools import (
    ToolArgumentError,
    ToolCall,
    ToolError,
    ToolMedia,
    ToolResult,
    VideoSource,
    available,
    get,
    tool,
)
from r1_mm.tools.calls import parse_calls
from r1_mm.tools.executor import ToolExecutor

# -- calls ----------------------------------------------------------------------------------------------

CALL_CASES = [
    # (text, [(name, arguments)], number of errors)
    ('<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [1, 2, 3, 4]}}\n</tool_call>',
     [("crop_image", {"bbox_2d": [1, 2, 3, 4]})], 0),
    ('think first <tool_call>{"name": "a", "arguments": {}}</tool_call> and <tool_call>{"name": "b", '
     '"arguments": {"x": 1}}</tool_call>', [("a", {}), ("b", {"x": 1})], 0),
    ('<tool_call>{"name": "a", "arguments": "{\\"x\\": 2}"}</tool_call>', [("a", {"x": 2})], 0),  # string args
    ('<tool_call>{"name": "a"}</tool_call>', [("a", {})], 0),  # no arguments: an empty object
    ("<answer>4</answer>", [], 0),  # no call: an answer
    ("I would call <tool_call> but", [], 1),  # unclosed
    ('<tool_call>{"name": "a", "arguments": {"x": 1}</tool_call>', [], 1),  # broken JSON
    ('<tool_call>{"arguments": {}}</tool_call>', [], 1),  # no name
    ('<tool_call>["crop_image"]</tool_call>', [], 1),  # not an object
    ('<tool_call>{"name": "a", "arguments": [1, 2]}</tool_call>', [], 1),  # arguments not an object
    ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', [], 1),  # name not a string
    ('<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>oops</tool_call>', [("a", {})], 1),
]


@pytest.mark.parametrize("text,calls,errors", CALL_CASES)
def test_hermes_calls_are_read_or_explained(text, calls, errors):
    parsed = parse_calls(text, "hermes")
    assert [(c.name, dict(c.arguments)) for c in parsed.calls] == calls
    assert len(parsed.errors) == errors
    assert all(e.startswith("tool call ") for e in parsed.errors)


def test_unknown_call_format_suggests_the_known_one():
    with pytest.raises(ValueError, match="did you mean 'hermes'"):
        parse_calls("", "hermse")


# -- registry and arguments -----------------------------------------------------------------------------


def test_builtins_are_listed_and_plugins_load_by_path(tmp_path):
    assert {"crop_image", "video_frames"} <= set(available())
    plugin = tmp_path / "my_tools.py"
    plugin.write_text(textwrap.dedent('''
        from r1_mm.tools import tool

        @tool("echo_plugin", description="say it back", parameters={"properties": {"text": {"type": "string"}},
                                                                     "required": ["text"]})
        def echo(media, text):
            return text.upper()

        def plain(media):
            return "not a tool"
    '''))
    echo = get(f"{plugin}:echo")
    assert echo.name == "echo_plugin" and get("echo_plugin") is echo
    assert echo.schema()["function"]["parameters"]["required"] == ["text"]
    assert echo(ToolMedia(), {"text": "hi"}).text == "HI"  # a str result becomes ToolResult(text=...)
    with pytest.raises(ToolError, match="not a tool: decorate"):
        get(f"{plugin}:plain")
    with pytest.raises(ToolError, match="did you mean 'crop_image'"):
        get("crop_imgae")


ARGUMENT_CASES = [
    ({"bbox_2d": [0, 0, 1, 1]}, None),
    ({"bbox_2d": [0, 0, 1, 1], "image_index": 1.0}, None),  # 1.0 is the integer 1
    ({}, "missing required argument(s) bbox_2d"),
    ({"bbox_2d": [0, 0, 1, 1], "zoom": 2}, "unknown argument(s) zoom"),
    ({"bbox_2d": "0,0,1,1"}, "must be a JSON array, got string"),
    ({"bbox_2d": [0, 0, 1]}, "must have 4 items, got 3"),
    ({"bbox_2d": [0, 0, 1, "x"]}, "must hold JSON numbers"),
    ({"bbox_2d": [0, 0, 1, 1], "image_index": True}, "must be a JSON integer, got boolean"),
    ({"bbox_2d": [0, 0, 1, 1], "image_index": 0.5}, "must be a JSON integer, got number"),
]


@pytest.mark.parametrize("arguments,problem", ARGUMENT_CASES)
def test_arguments_are_checked_against_the_schema(arguments, problem):
    crop = get("crop_image")
    if problem is None:
        checked = crop.check_arguments(arguments)
        assert all(type(v) is int for k, v in checked.items() if k == "image_index")
    else:
        with pytest.raises(ToolArgumentError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            crop.check_arguments(arguments)


# -- crop_image -----------------------------------------------------------------------------------------


def _gradient(width: int, height: int) -> Image.Image:
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([xs % 256, ys % 256, (xs + ys) % 256], -1).astype(np.uint8))


def test_crop_cuts_the_original_in_every_coordinate_system():
    original = _gradient(800, 600)
    media = ToolMedia(images=(original,), shown_sizes=((400, 300),))
    want = np.asarray(original.crop((200, 100, 400, 300)))
    for coordinates, box in [("shown", [100, 50, 200, 150]), ("original", [200, 100, 400, 300]),
                             ("normalized", [0.25, 1 / 6, 0.5, 0.5]), ("thousandths", [250, 1000 / 6, 500, 500])]:
        crop = get("crop_image").with_kwargs({"coordinates": coordinates})
        result = crop(media, {"bbox_2d": box})
        assert len(result.images) == 1 and "image 0" in result.text
        assert np.array_equal(np.asarray(result.images[0]), want), coordinates


def test_crop_widens_small_boxes_inside_the_image_and_zooms():
    original = _gradient(100, 80)
    media = ToolMedia(images=(original,), shown_sizes=((100, 80),))
    small = get("crop_image")(media, {"bbox_2d": [95, 0, 99, 4]})  # 4x4 at the corner: widened to 28x28 inside
    assert small.images[0].size == (28, 28)
    assert np.array_equal(np.asarray(small.images[0]), np.asarray(original.crop((72, 0, 100, 28))))
    zoomed = get("crop_image").with_kwargs({"zoom": 2.0})(media, {"bbox_2d": [10, 10, 50, 40]})
    assert zoomed.images[0].size == (80, 60)


@pytest.mark.parametrize("media,arguments,problem", [
    (ToolMedia(), {"bbox_2d": [0, 0, 1, 1]}, "has no image"),
    (ToolMedia(images=(Image.new("RGB", (50, 50)),)), {"bbox_2d": [0, 0, 1, 1], "image_index": 1}, "image_index"),
    (ToolMedia(images=(Image.new("RGB", (50, 50)),)), {"bbox_2d": [30, 0, 10, 20]}, "x1 < x2"),
    (ToolMedia(images=(Image.new("RGB", (50, 50)),)), {"bbox_2d": [60, 60, 90, 90]}, "outside image 0"),
])
def test_crop_refuses_wrong_calls_in_words(media, arguments, problem):
    with pytest.raises(ToolArgumentError, match=problem):
        get("crop_image")(media, arguments)


# -- video_frames ---------------------------------------------------------------------------------------

FPS = 10


@pytest.fixture(scope="module")
def clock_mp4(tmp_path_factory):
    return write_mp4(clock_frames(6.0, FPS, height=64, width=96), tmp_path_factory.mktemp("v") / "clock.mp4", FPS,
                     keyframe_interval=10)


def test_video_frames_decode_the_asked_span_with_its_times(clock_mp4):
    media = ToolMedia(videos=(VideoSource(ref=str(clock_mp4), root=None, duration=6.0, source_fps=FPS),))
    result = get("video_frames")(media, {"start": 2.0, "end": 3.0, "num_frames": 3})
    assert [clock_index(np.asarray(im)) for im in result.images] == [20, 25, 30]
    assert "2.00 s, 2.50 s, 3.00 s" in result.text
    assert result.images[0].size == (96, 64)  # the source's resolution, not the prompt's budget
    past_end = get("video_frames")(media, {"start": 5.5, "end": 60})
    assert [clock_index(np.asarray(im)) for im in past_end.images][-1] == 59  # clipped to the last frame


def test_video_frames_from_a_frame_list_and_its_limits():
    frames = list(clock_frames(2.0, FPS, height=64, width=96))
    media = ToolMedia(videos=(VideoSource(ref=frames, root=None, duration=2.0, source_fps=FPS),))
    result = get("video_frames")(media, {"start": 0.5, "end": 1.5, "num_frames": 2})
    assert [clock_index(np.asarray(im)) for im in result.images] == [5, 15]
    tool_ = get("video_frames").with_kwargs({"max_frames": 4})
    for arguments, problem in [({"start": 0, "end": 1, "num_frames": 5}, "num_frames must be 1..4"),
                               ({"start": 1, "end": 0.5}, "start < end"),
                               ({"start": 3, "end": 4}, "past the video's end"),
                               ({"start": 0, "end": 1, "video_index": 2}, "video_index")]:
        with pytest.raises(ToolArgumentError, match=problem):
            tool_(media, arguments)


# -- executor -------------------------------------------------------------------------------------------


@tool("t_sleep", description="sleeps", parameters={"properties": {"s": {"type": "number"}}, "required": ["s"]})
def _sleep(media, s):
    time.sleep(s)
    return ToolResult(text=f"slept {s}", images=[Image.new("RGB", (4, 4))])


@tool("t_raise", description="raises", parameters={"properties": {}})
def _raise(media):
    raise RuntimeError("boom")


@tool("t_bad_image", description="returns a non-image", parameters={"properties": {}})
def _bad_image(media):
    return ToolResult(images=[np.zeros((4, 4, 3))])


def test_every_failure_is_an_error_text_and_a_count():
    executor = ToolExecutor({t: get(t) for t in ("t_sleep", "t_raise", "t_bad_image", "crop_image")}, timeout_s=0.5)
    calls = [ToolCall("t_sleep", {"s": 0.01}), ToolCall("nope", {}), ToolCall("t_sleep", {"s": "x"}),
             ToolCall("t_raise", {}), ToolCall("t_sleep", {"s": 3.0}), ToolCall("t_bad_image", {})]
    try:
        outcomes = executor.run([(c, ToolMedia()) for c in calls])
    finally:
        executor.close()
    assert [o.status for o in outcomes] == ["ok", "unknown_tool", "bad_arguments", "raised", "timeout", "raised"]
    assert outcomes[0].result.text == "slept 0.01" and len(outcomes[0].result.images) == 1
    assert "unknown tool 'nope'; the tools are: crop_image, t_bad_image, t_raise, t_sleep" in outcomes[1].result.text
    assert "RuntimeError: boom" in outcomes[3].result.text
    assert "longer than 0.5 s" in outcomes[4].result.text
    assert "PIL images" in outcomes[5].result.text
    assert all(o.result.text.startswith("Error: ") for o in outcomes[1:])
    assert executor.counts == {"ok": 1, "unknown_tool": 1, "bad_arguments": 1, "raised": 2, "timeout": 1}


def test_calls_run_concurrently_and_each_deadline_counts_from_its_start():
    executor = ToolExecutor({"t_sleep": get("t_sleep")}, timeout_s=1.0, workers=2)
    seen = threading.active_count()
    start = time.perf_counter()
    try:
        # 4 calls of 0.6 s on 2 workers: the last two start at ~0.6 s and still finish within their own 1 s
        outcomes = executor.run([(ToolCall("t_sleep", {"s": 0.6}), ToolMedia()) for _ in range(4)])
    finally:
        executor.close()
    elapsed = time.perf_counter() - start
    assert [o.status for o in outcomes] == ["ok"] * 4
    assert 1.1 < elapsed < 2.0, elapsed  # two rounds of two concurrent calls, not four in a row (2.4 s)
    assert threading.active_count() >= seen


# -- the command line and the recipe --------------------------------------------------------------------


def test_tools_check_calls_a_tool_on_a_row_at_full_resolution(tmp_path, synthetic_data, capsys):
    from r1_mm.cli import main

    assert main(["tools", "list"]) == 0
    assert "crop_image" in capsys.readouterr().out
    data = synthetic_data["counting"]  # 112x112 images, shown at 112x112 under the default budget
    assert main(["tools", "check", "crop_image", "--data", str(data), "--row", "1", "--args",
                 '{"bbox_2d": [0, 0, 56, 56]}', "--kwargs", '{"zoom": 2.0}', "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "image 0: 112x112 px, shown at 112x112" in out and "returned image 0: 112x112 px" in out
    assert len(list(tmp_path.glob("crop_image-row*-0.png"))) == 1
    # refusals: the model's arguments, a recipe kwarg the tool does not take, an unknown tool, a row past the end
    assert main(["tools", "check", "crop_image", "--data", str(data), "--args", '{"bbox_2d": [9, 9, 1, 1]}']) == 1
    assert "the arguments are refused (the model would read this): crop_image: bbox_2d must be" in capsys.readouterr().err
    assert main(["tools", "check", "crop_image", "--data", str(data), "--args", "{}", "--kwargs", '{"zom": 2}']) == 1
    assert "kwargs.zom is not an option of tool 'crop_image'; did you mean 'zoom'?" in capsys.readouterr().err
    assert main(["tools", "check", "crop_imag", "--data", str(data), "--args", "{}"]) == 1
    assert "did you mean 'crop_image'" in capsys.readouterr().err
    assert main(["tools", "check", "crop_image", "--data", str(data), "--row", "99", "--args", "{}"]) == 1
    assert "--row 99 is not one of them" in capsys.readouterr().err


def test_tools_check_re_watches_a_videos_span(synthetic_data, capsys):
    from r1_mm.cli import main

    assert main(["tools", "check", "video_frames", "--data", str(synthetic_data["events"]), "--args",
                 '{"start": 1.0, "end": 2.0, "num_frames": 3}']) == 0
    out = capsys.readouterr().out
    assert "video 0: 8.00 s" in out and "3 frame(s) of video 0 at 1.00 s, 1.50 s, 2.00 s" in out


def test_a_tool_recipe_is_checked_at_load():
    """Tools run on the hf and vllm_colocate engines with GRPO; names and options resolve before any model loads."""
    from r1_mm.config.recipe import ConfigError, RecipeConfig
    from r1_mm.run.input_checks import check

    assert RecipeConfig.from_dict({}).tools.functions == []
    ok = RecipeConfig.from_dict({"rewards": {"functions": ["accuracy"]},
                                 "tools": {"functions": ["crop_image", {"name": "video_frames", "kwargs": {"max_frames": 4}}]}})
    check(ok)
    pool = RecipeConfig.from_dict({"rewards": {"functions": ["accuracy"]}, "rollout": {"engine": "vllm_pool"},
                                   "tools": {"functions": ["crop_image"]}})  # its servers take token-ids prompts
    check(pool)
    colocate = RecipeConfig.from_dict({"rewards": {"functions": ["accuracy"]}, "rollout": {"engine": "vllm_colocate"},
                                       "tools": {"functions": ["crop_image"]}})
    check(colocate)
    with pytest.raises(ConfigError, match=r"vllm_max_model_len \(8192\) is below data.max_prompt_length \+ "
                                          r"tools.max_total_tokens \(9000\)"):
        RecipeConfig.from_dict({"rollout": {"engine": "vllm_colocate"}, "data": {"max_prompt_length": 1000},
                                "tools": {"functions": ["crop_image"], "max_total_tokens": 8000}})
    with pytest.raises(ConfigError, match="tools.max_turns must be >= 1"):
        RecipeConfig.from_dict({"tools": {"max_turns": 0}})
    bad = RecipeConfig.from_dict({"rewards": {"functions": ["accuracy"]},
                                  "tools": {"functions": ["crop_imag", {"name": "crop_image", "kwargs": {"zom": 2}}]}})
    with pytest.raises(ConfigError) as info:
        check(bad)
    assert "tools.functions[0]: unknown tool 'crop_imag'; did you mean 'crop_image'?" in str(info.value)
    assert "tools.functions[1].kwargs.zom is not an option of tool 'crop_image'; did you mean 'zoom'?" in str(info.value)


# -- the tool_use reward (DeepEyes' bonus) ----------------------------------------------------------------

TOOL_USE_CASES = [
    # (executed calls, completion, solution, reward)
    (1, "<answer>3</answer>", "3", 1.0),  # a successful call and a right answer: the bonus
    (2, "<answer>3</answer>", "3", 1.0),
    (1, "<answer>4</answer>", "3", 0.0),  # a call, a wrong answer: nothing (DeepEyes: 1[R_acc > 0] R_tool)
    (0, "<answer>3</answer>", "3", 0.0),  # right without a call: no bonus
    (0, "<answer>4</answer>", "3", 0.0),
    (1, "3", "3", 0.0),  # no answer tag: accuracy 0
]


def test_tool_use_pays_for_calls_only_with_right_answers():
    from r1_mm.rewards.registry import get as get_reward

    fn = get_reward("tool_use")
    trajectories = [{"executed_calls": n, "calls": [], "model_turns": 1 + n, "final_text": "", "stop_reason": "answer"}
                    for n, *_ in TOOL_USE_CASES]
    got = fn(completions=[c for _, c, _, _ in TOOL_USE_CASES], solution=[s for *_, s, _ in TOOL_USE_CASES],
             trajectories=trajectories, prompts=[None] * len(TOOL_USE_CASES))
    assert got == [r for *_, r in TOOL_USE_CASES]
    # not a tool run: not applicable; a trajectory-less completion in a tool run, too
    assert fn(completions=["<answer>3</answer>"], solution=["3"]) == [None]
    assert fn(completions=["<answer>3</answer>"] * 2, solution=["3"] * 2, trajectories=[None, trajectories[0]]) == [None, 1.0]
    # another judge: numeric with its own kwargs
    assert fn(completions=["3.0"], solution=["3"], trajectories=trajectories[:1], answer_reward="numeric",
              answer_kwargs={"require_tag": False}) == [1.0]
    assert fn.needs_for({}) == {"solution"}


def test_accuracy_with_and_without_a_call():
    from r1_mm.rollout.agentic import accuracy_by_call

    got = accuracy_by_call([True, False, True, None, True], [True, True, False, False, False])
    assert got == {"tools/accuracy_with_call": 0.5, "tools/accuracy_without_call": 1.0}
    assert np.isnan(accuracy_by_call([True], [False])["tools/accuracy_with_call"])


def test_format_reward_judges_a_trajectory_by_its_answer_turn():
    from r1_mm.rewards.registry import get as get_reward

    fn = get_reward("format")
    whole = '<tool_call>{"name": "crop_image"}</tool_call>\n<tool_response>\nZoomed.\n</tool_response>\n' \
            "<think>three</think><answer>3</answer>"
    answer = {"final_text": "<think>three</think><answer>3</answer>", "calls": [], "executed_calls": 1,
              "model_turns": 2, "stop_reason": "answer"}
    assert fn(completions=[whole]) == [0.0]  # the whole text is not think + answer
    assert fn(completions=[whole, whole], trajectories=[answer, {**answer, "final_text": "3"}]) == [1.0, 0.0]


def test_the_zoom_task_is_readable_only_after_a_crop(tmp_path):
    """The demo task's premise: at the prompt budget the whole detail fits in one visual token, while crop_image on
    the row's region (the call a policy should learn) returns it at full resolution, as many tokens as the plain
    counting task uses; the squares there are exactly the solution's count."""
    from r1_mm.config.recipe import MediaConfig
    from r1_mm.data.loading import read_rows
    from r1_mm.data.media import load_image
    from r1_mm.testing.synthetic import counting_image, make_zoom_task

    path = make_zoom_task(tmp_path, 6, seed=3)
    budget = MediaConfig(min_pixels=3136, max_pixels=112 * 112)
    for row in read_rows(path):
        shown = load_image(row["image"], budget, factor=28, root=tmp_path)
        assert shown.size == (112, 112)  # 4 x 4 tokens of 28 px for the whole 448 image
        x1, y1, x2, y2 = row["region"]
        scale = shown.width / 448
        assert (x2 - x1) * scale <= 28 and (y2 - y1) * scale <= 28  # the detail: one token
        media = ToolMedia(images=(Image.open(tmp_path / row["image"]).convert("RGB"),), shown_sizes=(shown.size,))
        crop = get("crop_image").with_kwargs({"coordinates": "original"})(media, {"bbox_2d": row["region"]})
        (region,) = crop.images
        assert region.size == (112, 112)  # 16 tokens, the counting demo's image size
        arr = np.asarray(region)
        squares = (arr.max(-1) > 100).sum() // (16 * 16)  # each square 16 x 16 px, bright
        assert squares == int(row["solution"])
    assert counting_image(2, seed=0).size == (112, 112)


def test_tool_images_count_against_vllms_images_per_prompt_at_load(tmp_path, synthetic_data):
    """A continuation carries the prompt's images and every tool image: a row whose images plus the tools' most
    (max_tool_calls x max_images_per_call) pass rollout.vllm_max_images_per_prompt is refused at load, in one line."""
    from r1_mm.config.recipe import RecipeConfig
    from r1_mm.data.loading import read_rows
    from r1_mm.data.row_checks import row_problems

    rows = read_rows(synthetic_data["counting"])
    base = {"rollout": {"engine": "vllm_colocate"}, "rewards": {"functions": ["accuracy"]}}
    ok = RecipeConfig.from_dict({**base, "tools": {"functions": ["crop_image"], "max_tool_calls": 4,
                                                   "max_images_per_call": 1}})
    assert row_problems(ok, rows, "rows.jsonl", synthetic_data["counting"].parent) == []
    over = RecipeConfig.from_dict({**base, "tools": {"functions": ["crop_image"], "max_tool_calls": 2,
                                                     "max_images_per_call": 4}})
    (problem,) = row_problems(over, rows, "rows.jsonl", synthetic_data["counting"].parent)
    assert "1 image(s) in the prompt + up to 8 tool images" in problem
    assert "rollout.vllm_max_images_per_prompt=8" in problem
