"""Rewards score what they claim: each bug found against the libraries they build on (jiwer,
math-verify, TRL's own rewards, run here as oracles) fixed, and rewards usable from anywhere."""

from __future__ import annotations

import subprocess
import sys

import pytest

from r1_mm.config.recipe import RewardSpec
from r1_mm.rewards.parsing import extract_answer
from r1_mm.rewards.registry import RewardError
from r1_mm.rewards.runner import RewardRunner
from r1_mm.rewards.text_similarity import word_accuracy
from r1_mm.rewards.verifiable import accuracy, mcq, numeric, relative_accuracy


def run(name: str, texts: list[str], rows: list[dict], timeout_s: float | None = None, **spec) -> list[float | None]:
    runner = RewardRunner([RewardSpec(name=name, **spec)], timeout_s=timeout_s)
    batch = runner(prompts=[[]] * len(texts), completions=texts, completion_ids=[[1]] * len(texts),
                   rows=rows, row_ids=[f"r{i}" for i in range(len(texts))])
    return [None if v != v else v for v in batch.per_function[:, 0].tolist()]


def test_ocr_words_are_split_on_any_whitespace():
    import jiwer

    for prediction, reference in (("stop\nhere", "stop here"), ("no\tentry\nzone", "no entry zone"), ("a  b", "a b c")):
        oracle = 1 - jiwer.wer(" ".join(reference.split()), " ".join(prediction.split()))
        assert word_accuracy(prediction, reference) == pytest.approx(max(0.0, oracle))
    assert word_accuracy("stop\nhere", "stop here") == 1.0


@pytest.mark.parametrize(("answer", "solution", "right"), [
    ("2^{10}", "2", False), ("2^{10}", "1024", True), ("10^{3}", "10", False), ("\\frac{1}{2}", "0.5", True),
    ("x = 2", "2", True), ("3", "3.0", True), ("\\sqrt{2}", "2", False)])
def test_accuracy_reads_bare_latex_as_latex(answer, solution, right):
    from math_verify import parse, verify

    oracle = bool(verify(parse(f"${solution}$"), parse(f"${answer}$")))  # math-verify on delimited LaTeX
    assert oracle == right
    assert accuracy([f"<answer>{answer}</answer>"], [solution]) == [float(right)]


@pytest.mark.parametrize(("answer", "solution"), [("3/4", "0.75"), ("\\frac{3}{4}", "0.75"), ("-1/2", "-0.5"),
                                                  ("about 1/2 of it", "0.5"), ("It is 1/4.", "0.25"),
                                                  ("-\\frac{1}{2}", "-0.5"), ("\\frac72", "3.5"), ("$2^{10}$", "1024")])
def test_fractions_are_read_as_their_value(answer, solution):
    assert numeric([f"<answer>{answer}</answer>"], [solution]) == [1.0]
    assert relative_accuracy([f"<answer>{answer}</answer>"], [solution]) == [pytest.approx(1.0)]
    assert numeric(["<answer>3</answer>"], ["3/4"]) == [0.0]  # and the solution's fraction is not its numerator


def test_mcq_letters_inside_option_text_are_not_choices():
    options = [["A. A cat", "B. A dog", "C. Two birds"]] * 5
    answers = ["B. A dog", "A dog", "(B)", "A or B", "B. a dog"]
    got = mcq([f"<answer>{a}</answer>" for a in answers], ["B"] * 5, options)
    assert got == [1.0, 1.0, 1.0, 0.0, 1.0]  # naming two options is still wrong


def test_answer_extraction_is_linear_on_unclosed_tags():
    """Two million unclosed tags: the lazy regex took 15 s on 200,000 and grew with the square (about
    25 minutes here); reverse searches take milliseconds. The subprocess's deadline only keeps a
    regression from stalling the suite; bench/rewards.py times hostile strings."""
    text = "<answer>" * 200_000 + "3"
    assert extract_answer(text) is None
    assert extract_answer(text + "</answer>") == "3"
    script = ("from r1_mm.rewards.parsing import extract_answer\n"
              "text = '<answer>' * 2_000_000 + '3'\n"
              "print(extract_answer(text), extract_answer(text + '</answer>'))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.split() == ["None", "3"], proc.stderr[-2000:]


def test_rewards_work_from_a_script_without_a_main_guard(tmp_path):
    """math-verify's worker is a subprocess, not a multiprocessing child that re-imports the script."""
    script = "from r1_mm.rewards.verifiable import accuracy\nprint(accuracy(['<answer>\\\\frac{1}{2}</answer>'], ['0.5']))\n"
    proc = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[1.0]", proc.stderr[-2000:]


def test_numpy_returns_are_numbers(tmp_path):
    plugin = tmp_path / "np_reward.py"
    plugin.write_text("import numpy as np\ndef score(completions, **_):\n    return np.array([0.5] * len(completions), "
                      "dtype=np.float32)\n")
    assert run(f"{plugin}:score", ["a", "b"], [{}, {}]) == [0.5, 0.5]


def test_rewards_timeout(tmp_path):
    """A call past rewards.timeout_s fails, and the worker process running it is killed (by pid)."""
    import psutil

    plugin = tmp_path / "slow.py"
    plugin.write_text("import time\ndef slow(completions, **_):\n    time.sleep(30)\n    return [1.0] * len(completions)\n")
    runner = RewardRunner([RewardSpec(name=f"{plugin}:slow")], timeout_s=0.5)
    runner.workers[0].ready()
    worker = runner.workers[0].pid
    with pytest.raises(RewardError, match="took longer than rewards.timeout_s=0.5 s; its worker process was killed"):
        runner(prompts=[[]], completions=["a"], completion_ids=[[1]], rows=[{}], row_ids=["r0"])
    assert not psutil.pid_exists(worker)
    runner.close()


def test_trl_reward_functions_and_plain_callables_work_unchanged(tmp_path):
    """TRL's own rewards take conversational completions ([{"role", "content"}]); they get them."""
    completions = ["The answer is \\boxed{\\frac{1}{2}}", "The answer is \\boxed{3}"]
    rows = [{"solution": "$\\frac{1}{2}$"}] * 2
    assert run("trl.rewards:accuracy_reward", completions, rows) == [1.0, 0.0]
    plugin = tmp_path / "plain.py"
    plugin.write_text("def length(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    assert run(f"{plugin}:length", ["ab", "abc"], [{}, {}]) == [2.0, 3.0]
    assert run(f"{plugin}:length", ["ab"], [{}], completions="messages") == [1.0]  # a list of one message
