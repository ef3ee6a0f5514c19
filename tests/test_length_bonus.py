"""Video-R1's length control (algorithm.grpo.length_bonus) and per-type answer hints in prompts."""

from __future__ import annotations

import torch

from r1_mm.config.recipe import DataConfig
from r1_mm.data.prompts import build_messages
from r1_mm.trainers.length_bonus import length_band_bonus


def test_bonus_goes_to_correct_answers_in_the_band_only_when_two_are_correct():
    correct = torch.tensor([True, True, False, True])
    lengths = torch.tensor([400, 100, 400, 512])
    got = length_band_bonus(correct, lengths, bonus=0.2, min_tokens=320, max_tokens=512)
    assert torch.allclose(got, torch.tensor([0.2, 0.0, 0.0, 0.2]))
    lone = length_band_bonus(torch.tensor([True, False]), torch.tensor([400, 400]), bonus=0.2,
                             min_tokens=320, max_tokens=512)
    assert lone.sum() == 0  # a single correct answer is not compared with anything


def test_per_type_instruction_follows_the_format_instruction():
    cfg = DataConfig(format_instruction="Think first.",
                     format_instruction_by_type={"numerical": " Give a number.", "OCR": " Transcribe."})
    row = {"id": "r1", "problem": "How many?", "problem_type": "numerical", "solution": "3"}
    texts = [p["text"] for p in build_messages(row, 0, cfg)[-1]["content"] if p["type"] == "text"]
    assert texts[-1] == "\nThink first. Give a number."
    plain = build_messages({**row, "problem_type": "free-form"}, 0, cfg)
    assert [p["text"] for p in plain[-1]["content"] if p["type"] == "text"][-1] == "\nThink first."
