import json

import pytest

from r1_mm.config.recipe import DataConfig, MediaConfig
from r1_mm.data import DataError, PromptBuilder, PromptStream, PromptTooLongError, build_messages, read_rows
from r1_mm.data.loading import default_media_root
from r1_mm.data.media import MediaError


@pytest.fixture(scope="module")
def processor(tiny_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_path("qwen2_5_vl"))


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_read_jsonl_json_parquet_and_saved_dataset(tmp_path, synthetic_data):
    import datasets

    rows = read_rows(synthetic_data["counting"])
    assert len(rows) == 8 and {"id", "image", "prompt", "solution", "problem_type"} <= set(rows[0])
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    assert read_rows(tmp_path / "rows.json") == rows
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    assert read_rows(tmp_path / "rows.parquet") == rows
    ds.save_to_disk(str(tmp_path / "saved"))
    assert read_rows(tmp_path / "saved") == rows
    assert read_rows(synthetic_data["counting"], max_rows=3) == rows[:3]


def test_bad_data_files_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_rows(bad)
    with pytest.raises(DataError, match="unsupported data format '.txt'"):
        (tmp_path / "x.txt").write_text("a,b\n")
        read_rows(tmp_path / "x.txt")
    with pytest.raises(DataError, match=r"x.csv: (no rows|cannot be read as csv)"):
        (tmp_path / "x.csv").write_text("a,b\n")
        read_rows(tmp_path / "x.csv")
    with pytest.raises(DataError, match="data file not found"):
        read_rows(tmp_path / "missing.jsonl")


def test_messages_plain_text_with_media_first_and_instruction():
    cfg = DataConfig(system_prompt="Be brief.", format_instruction="Answer in <answer></answer>.")
    row = {"image": "a.png", "prompt": "How many?", "options": ["A. 1", "B. 2"]}
    messages = build_messages(row, 0, cfg)
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "How many?\nA. 1\nB. 2"},
                                      {"type": "text", "text": "\nAnswer in <answer></answer>."}]


def test_messages_with_inline_marks_and_mismatch():
    cfg = DataConfig(format_instruction=None)
    row = {"images": ["a.png", "b.png"], "video": "v.mp4", "problem": "Compare <image> and <image> with <video> now"}
    parts = build_messages(row, 0, cfg)[0]["content"]
    assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text", "video", "text"]
    with pytest.raises(DataError, match=r"row 5: prompt has 1 <image> and 0 <video> marks but the row has 2 image"):
        build_messages({"images": ["a", "b"], "prompt": "see <image>"}, 5, cfg)
    with pytest.raises(DataError, match="row x: no prompt"):
        build_messages({"id": "x", "image": "a.png"}, 0, cfg)


def test_conversational_prompt_placeholders():
    cfg = DataConfig(format_instruction=None)
    conv = [{"role": "user", "content": "What happens?"}]
    parts = build_messages({"video": "v.mp4", "prompt": conv}, 0, cfg)[0]["content"]
    assert parts == [{"type": "video"}, {"type": "text", "text": "What happens?"}]
    conv2 = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(DataError, match="1 image and 0 video placeholders but the row has 2 image"):
        build_messages({"images": ["a", "b"], "prompt": conv2}, 0, cfg)


@pytest.mark.parametrize("task", ["counting", "spatial", "events", "multi_image"])
def test_prompts_render_with_chat_template_and_count_visual_tokens(processor, synthetic_data, task):
    path = synthetic_data[task]
    builder = PromptBuilder(processor, DataConfig(system_prompt="SYS"), MediaConfig(), default_media_root(path))
    row = rows_of(path)[0]
    sample = builder.prepare(row, 0)
    assert sample.prompt_text.startswith("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n")
    assert sample.prompt_text.endswith("<|im_start|>assistant\n")
    ids = sample.inputs["input_ids"][0].tolist()
    assert sample.num_prompt_tokens == len(ids)
    tok = processor.tokenizer
    n_image_pad = ids.count(tok.convert_tokens_to_ids("<|image_pad|>"))
    n_video_pad = ids.count(tok.convert_tokens_to_ids("<|video_pad|>"))
    if "image_grid_thw" in sample.inputs:
        assert n_image_pad == int(sample.inputs["image_grid_thw"].prod(-1).sum()) // 4
        assert len(sample.images) == len(sample.inputs["image_grid_thw"])
    if "video_grid_thw" in sample.inputs:
        assert n_video_pad == int(sample.inputs["video_grid_thw"].prod(-1).sum()) // 4
        # seconds per temporal patch come from the real sampling rate (not transformers' 24 fps default)
        assert float(sample.inputs["second_per_grid_ts"][0]) == pytest.approx(2 / sample.videos[0].sample_fps)
    assert n_image_pad + n_video_pad > 0


def test_long_prompts_are_never_truncated(processor, synthetic_data):
    path = synthetic_data["counting"]
    rows = rows_of(path)
    data_cfg = DataConfig(max_prompt_length=40, on_long_prompt="error")
    builder = PromptBuilder(processor, data_cfg, MediaConfig(), default_media_root(path))
    with pytest.raises(PromptTooLongError, match=r"row counting-0: prompt is \d+ tokens .* over data.max_prompt_length=40"):
        builder.prepare(rows[0], 0)
    # drop policy: rows are counted, and an all-too-long dataset is a clear error rather than a hang
    drop_cfg = DataConfig(max_prompt_length=40, on_long_prompt="drop", shuffle=False)
    stream = PromptStream(rows, PromptBuilder(processor, drop_cfg, MediaConfig(), default_media_root(path)),
                          data_cfg=drop_cfg, media_cfg=MediaConfig())
    with pytest.raises(DataError, match="no usable rows"):
        stream.next_batch(1)
    assert stream.report.dropped_long_prompt >= len(rows)


def test_bad_media_rows_fail_or_are_skipped_and_counted(processor, synthetic_data, tmp_path):
    path = synthetic_data["counting"]
    rows = rows_of(path)
    rows[1]["image"] = "images/does_not_exist.png"
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG garbage")
    rows[3]["image"] = str(tmp_path / "corrupt.png")
    root = default_media_root(path)
    data_cfg = DataConfig(shuffle=False)
    strict = MediaConfig(on_bad_media="error")
    stream = PromptStream(rows, PromptBuilder(processor, data_cfg, strict, root), data_cfg=data_cfg, media_cfg=strict)
    stream.next_batch(1)
    with pytest.raises(MediaError, match=r"row counting-1: cannot load media '.*does_not_exist.png'"):
        stream.next_batch(1)
    lenient = MediaConfig(on_bad_media="skip")
    stream = PromptStream(rows, PromptBuilder(processor, data_cfg, lenient, root), data_cfg=data_cfg, media_cfg=lenient)
    batch = stream.next_batch(6)
    assert [s.row_id for s in batch] == ["counting-0", "counting-2", "counting-4", "counting-5", "counting-6", "counting-7"]
    assert stream.report.skipped_bad_media == 2
    assert stream.report.counts()["data/skipped_bad_media"] == 2
    assert any("does_not_exist.png" in m for m in stream.report.examples)
    assert any("corrupt.png" in m for m in stream.report.examples)


def test_stream_state_resumes_exactly(processor, synthetic_data):
    path = synthetic_data["counting"]
    rows = rows_of(path)
    cfg = DataConfig()
    make = lambda: PromptStream(rows, PromptBuilder(processor, cfg, MediaConfig(), default_media_root(path)),
                                data_cfg=cfg, media_cfg=MediaConfig(), seed=7)
    full = make()
    ids = [s.row_id for s in full.next_batch(13)]  # crosses an epoch boundary (8 rows)
    assert sorted(ids[:8]) == sorted(r["id"] for r in rows)  # each row once per epoch
    first = make()
    head = [s.row_id for s in first.next_batch(5)]
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = [s.row_id for s in resumed.next_batch(8)]
    assert head + tail == ids


def test_stream_shards_are_disjoint(processor, synthetic_data):
    path = synthetic_data["counting"]
    rows = rows_of(path)
    cfg = DataConfig()
    shards = [PromptStream(rows, PromptBuilder(processor, cfg, MediaConfig(), default_media_root(path)),
                           data_cfg=cfg, media_cfg=MediaConfig(), seed=3, shard=(i, 2)) for i in range(2)]
    a = {s.row_id for s in shards[0].next_batch(4)}
    b = {s.row_id for s in shards[1].next_batch(4)}
    assert not a & b and len(a | b) == 8
