"""Token in, token out for tool turns: a trajectory extended turn by turn (the prompt's ids, the model's own
tokens, each tool turn tokenised alone with its images) has exactly the ids, pixels and image grids the
processor gives for the whole conversation rendered at once, so the learner's positions (M-RoPE included)
for images appended mid-conversation are the processor's. Checked per family whose template takes tools."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from r1_mm.config.recipe import DataConfig, MediaConfig
from r1_mm.data import PromptBuilder
from r1_mm.data.loading import default_media_root, read_rows
from r1_mm.data.turns import TurnTemplateError, budget_image, continuation_text, encode_turn, tool_message
from r1_mm.tools import get

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
TURN_ONE = '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [0, 0, 56, 56]}}\n</tool_call>'
TURN_TWO = '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [28, 28, 84, 84]}}\n</tool_call>'


def _ids(inputs) -> list[int]:
    return inputs["input_ids"][0].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_three_turn_trajectory_tokenises_as_the_whole_conversation(tiny_path, synthetic_data, family):
    processor = AutoProcessor.from_pretrained(tiny_path(family))
    tokenizer = processor.tokenizer
    data = synthetic_data["counting"]
    media = MediaConfig()
    sample = PromptBuilder(processor, DataConfig(), media, default_media_root(data)).prepare(read_rows(data)[0], 0)
    end = "<|im_end|>"
    end_id = tokenizer.convert_tokens_to_ids(end)
    crops = [budget_image(Image.new("RGB", (90, 70), c), processor, min_pixels=media.min_pixels,
                          max_pixels=media.max_pixels) for c in ("red", "blue")]

    # turn by turn: model tokens as sampled (here: the text's tokens + the end token), tool turns alone
    ids = _ids(sample.inputs)
    pixels, grids = [sample.inputs["pixel_values"]], [sample.inputs["image_grid_thw"]]
    for model_text, crop, note in ((TURN_ONE, crops[0], "Zoomed into [0, 0, 56, 56] of image 0."),
                                   (TURN_TWO, crops[1], "Zoomed into [28, 28, 84, 84] of image 0.")):
        ids += tokenizer(model_text, add_special_tokens=False)["input_ids"] + [end_id]
        turn = encode_turn(processor, continuation_text(processor, [tool_message(note, 1)], end), [crop])
        ids += _ids(turn)
        pixels.append(turn["pixel_values"])
        grids.append(turn["image_grid_thw"])
    ids += tokenizer("<answer>3</answer>", add_special_tokens=False)["input_ids"] + [end_id]

    # the whole conversation at once
    messages = sample.messages + [
        {"role": "assistant", "content": [{"type": "text", "text": TURN_ONE}]},
        tool_message("Zoomed into [0, 0, 56, 56] of image 0.", 1),
        {"role": "assistant", "content": [{"type": "text", "text": TURN_TWO}]},
        tool_message("Zoomed into [28, 28, 84, 84] of image 0.", 1),
        {"role": "assistant", "content": [{"type": "text", "text": "<answer>3</answer>"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text.endswith(end + "\n")
    whole = encode_turn(processor, text[: -len("\n")], [*sample.images, *crops])
    assert ids == _ids(whole)
    assert torch.equal(torch.cat(grids), whole["image_grid_thw"])
    assert torch.equal(torch.cat(pixels), whole["pixel_values"])
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = processor.image_processor.merge_size ** 2
    assert ids.count(image_pad) == int(whole["image_grid_thw"].prod(-1).sum()) // merge  # 3 images' tokens


def test_tools_appear_in_the_system_turn_and_results_in_a_tool_response(tiny_path):
    processor = AutoProcessor.from_pretrained(tiny_path("qwen2_5_vl"))
    plain = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    with_tools = processor.apply_chat_template(plain, tools=[get("crop_image").schema()], tokenize=False,
                                               add_generation_prompt=True)
    assert '<tools>\n{"type": "function", "function": {"name": "crop_image"' in with_tools
    assert with_tools.count("<|im_start|>system") == 1
    text = continuation_text(processor, [tool_message("a", 1), tool_message("b", 0)], "<|im_end|>")
    # Qwen's form: consecutive tool results share one user turn
    assert text == ("\n<|im_start|>user\n<tool_response>\na<|vision_start|><|image_pad|><|vision_end|>\n"
                    "</tool_response>\n<tool_response>\nb\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_a_template_that_ends_turns_otherwise_is_refused(tiny_path):
    processor = AutoProcessor.from_pretrained(tiny_path("qwen2_5_vl"))
    with pytest.raises(TurnTemplateError, match="not with the model's end-of-turn token '</s>'"):
        continuation_text(processor, [tool_message("a", 0)], "</s>")


def _trajectory(processor, sample, crops, notes, turns):
    """A trajectory of len(turns) model turns with a tool turn (one crop each) between them: the ids turn by
    turn (TrajectoryBuilder), and the whole conversation's messages."""
    from r1_mm.data.turns import TrajectoryBuilder

    tokenizer = processor.tokenizer
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    builder = TrajectoryBuilder(with_token_types="mm_token_type_ids" in sample.inputs)
    messages = list(sample.messages)
    for k, text in enumerate(turns):
        builder.add_model_turn(tokenizer(text, add_special_tokens=False)["input_ids"] + [end_id])
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        if k < len(crops):
            builder.add_tool_turn(encode_turn(processor, continuation_text(processor, [tool_message(notes[k], 1)],
                                                                          "<|im_end|>"), [crops[k]]))
            messages.append(tool_message(notes[k], 1))
    return builder, messages


@pytest.mark.parametrize("family", FAMILIES)
def test_learner_scores_a_trajectory_as_the_model_scores_the_whole_conversation(tiny_path, synthetic_data, family):
    """The grouped and the naive forward on [prompt | trajectory] (tool images mid-completion, two trajectories
    and a plain completion per prompt, two prompts) equal one forward of the processor's whole conversation, at
    the model's own tokens, to 1e-5; tool tokens are not scored."""
    from transformers import AutoModelForImageTextToText

    from r1_mm.models.forward.scoring import score_completions

    path = tiny_path(family)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval()
    data = synthetic_data["counting"]
    media = MediaConfig()
    builder_of = PromptBuilder(processor, DataConfig(), media, default_media_root(data))
    samples = [builder_of.prepare(row, i) for i, row in enumerate(read_rows(data)[:2])]
    crop = lambda colour, size: budget_image(Image.new("RGB", size, colour), processor, min_pixels=media.min_pixels,
                                             max_pixels=media.max_pixels)
    cases = []  # (sample, token ids, context or None, whole-conversation messages, images)
    for s, sample in enumerate(samples):
        crops = [crop("red", (90, 70)), crop("blue", (60, 120))]
        builder, messages = _trajectory(processor, sample, crops, ["zoom one", "zoom two"], [TURN_ONE, TURN_TWO, "<answer>3</answer>"])
        cases.append((sample, builder.ids, builder.context(), messages, [*sample.images, *crops]))
        builder, messages = _trajectory(processor, sample, crops[1:], ["only one"], [TURN_TWO, f"<answer>{s}</answer>"])
        cases.append((sample, builder.ids, builder.context(), messages, [*sample.images, crops[1]]))
        plain = processor.tokenizer("<answer>5</answer>", add_special_tokens=False)["input_ids"]
        cases.append((sample, plain, None, None, None))

    ids = [c[1] for c in cases]
    contexts = [c[2] for c in cases]
    from r1_mm.models.forward.packed_attention import KERNEL_CALLS

    scores, packed_calls = {}, {}
    with torch.no_grad():
        for mode in ("grouped", "naive"):
            before = KERNEL_CALLS["sdpa"]
            scores[mode] = score_completions(model, samples, ids, 3, processor.tokenizer.pad_token_id,
                                             temperature=1.0, mode=mode, contexts=contexts)
            packed_calls[mode] = KERNEL_CALLS["sdpa"] - before
    # the premise: the grouped scores came through the packed attention (once per text layer), the naive ones did not
    assert packed_calls["grouped"] == model.config.get_text_config().num_hidden_layers and packed_calls["naive"] == 0
    with torch.no_grad():
        for row, (sample, completion, context, messages, images) in enumerate(cases):
            if context is None:
                continue
            text = processor.apply_chat_template(messages, tokenize=False)[: -len("\n")]
            whole = encode_turn(processor, text, images)
            n = sample.inputs["input_ids"].shape[1]
            assert whole["input_ids"][0, n:].tolist() == completion
            logits = model(**whole).logits[0].float()
            logp = torch.log_softmax(logits[n - 1:-1], -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
            model_mask = torch.tensor(context.model_mask, dtype=torch.bool)
            assert 0 < int(model_mask.sum()) < len(completion)
            for mode, (logps, _, mask) in scores.items():
                assert mask[row, : len(completion)].tolist() == context.model_mask, mode
                gap = (logps[row, : len(completion)][model_mask] - logp[model_mask]).abs().max()
                assert float(gap) < 1e-5, (mode, row, float(gap))
                assert bool((logps[row, : len(completion)][~model_mask] == 0).all())
    assert torch.allclose(scores["grouped"][0], scores["naive"][0], atol=1e-5)


def test_trajectory_gradients_grouped_equal_naive(tiny_path, synthetic_data):
    """The loss's gradients through a trajectory with tool images: the grouped forward (vision and prompt once per
    group) gives the naive forward's to 1e-5."""
    from transformers import AutoModelForImageTextToText

    from r1_mm.models.forward.scoring import score_completions

    path = tiny_path("qwen2_5_vl")
    processor = AutoProcessor.from_pretrained(path)
    data = synthetic_data["counting"]
    media = MediaConfig()
    sample = PromptBuilder(processor, DataConfig(), media, default_media_root(data)).prepare(read_rows(data)[0], 0)
    crops = [budget_image(Image.new("RGB", (90, 70), "red"), processor, min_pixels=media.min_pixels,
                          max_pixels=media.max_pixels)]
    builder, _ = _trajectory(processor, sample, crops, ["zoom"], [TURN_ONE, "<answer>3</answer>"])
    plain = processor.tokenizer("<answer>2</answer>", add_special_tokens=False)["input_ids"]
    grads = {}
    for mode in ("grouped", "naive"):
        model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").train()
        logps, _, mask = score_completions(model, [sample], [builder.ids, plain], 2, processor.tokenizer.pad_token_id,
                                           temperature=1.0, mode=mode, contexts=[builder.context(), None])
        (logps * mask).sum().backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["grouped"].keys() == grads["naive"].keys()
    assert any("visual" in n for n in grads["grouped"])  # the tool image's pixels went through the vision tower
    worst = max(float((grads["grouped"][n] - grads["naive"][n]).abs().max()) for n in grads["grouped"])
    assert worst < 1e-5, worst
