"""The built-in verifiable rewards: hand-checked values, VSI-Bench MRA, and hypothesis on every parser."""

from __future__ import annotations

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r1_mm.config.recipe import RewardSpec
from r1_mm.rewards import get, math_check
from r1_mm.rewards.math_check import MathChecker
from r1_mm.rewards.parsing import extract_answer, first_number, numbers
from r1_mm.rewards.registry import RewardError
from r1_mm.rewards.runner import RewardRunner
from r1_mm.rewards.verifiable import mean_relative_accuracy, vsi_parse_number


def call(name: str, completions: list[str], **columns):
    return get(name)(completions=completions, prompts=[""] * len(completions),
                     completion_ids=[[0] * 3 for _ in completions], **columns)


def tagged(*answers: str) -> list[str]:
    return [f"<think>x</think><answer>{a}</answer>" for a in answers]


def test_get_returns_registered_callables():
    for name in ["accuracy", "mcq", "numeric", "mra", "temporal_iou", "bbox_iou", "yes_no", "ocr", "free_form",
                 "format", "overlong", "repetition", "by_problem_type", "critic", "relative_accuracy"]:
        assert callable(get(name))
    with pytest.raises(RewardError, match="unknown reward 'acuracy'; did you mean 'accuracy'"):
        get("acuracy")


def test_accuracy_math_and_strings():
    out = call("accuracy", tagged("\\frac{1}{2}", "0.5", "2(x+1)", "Paris.", "3", "") + ["no tags 0.5"],
               solution=["0.5", "$\\frac{1}{2}$", "2x+2", "paris", "4", "1", "0.5"])
    assert out == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert call("accuracy", tagged("1"), solution=[None]) == [None]


def test_math_check_has_a_hard_time_limit():
    """A LaTeX bomb (sympy needs ~8 s for this gcd of a huge factorial) is killed at the limit: the
    worker process that ran it is gone and the check scores False; a new worker answers the next one."""
    checker = MathChecker()
    try:
        assert checker.equivalent("\\frac{1}{2}", "0.5", 10.0)  # warm: the worker process is up
        first = checker._process.pid
        assert checker.equivalent("$\\gcd(10^{100000}!, 7)$", "$1$", 0.5) is False
        assert checker.timeouts == 1 and not psutil.pid_exists(first)
        assert checker.equivalent("2", "2.0", 10.0)  # a fresh worker answers again
        assert checker._process.pid != first
    finally:
        checker.close()


def test_mcq_letters_options_and_hedging():
    options = [["A. circle", "B. square", "C. star"]] * 7
    out = call("mcq", tagged("B", "(B)", "B. square", "square", "A or B", "A, B", "C"), solution=["B"] * 7,
               options=options)
    assert out == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_numeric_tolerances():
    assert call("numeric", tagged("3", "3.05", "2,000", "x"), solution=["3", "3", "2000", "1"]) == [1.0, 0.0, 1.0, 0.0]
    assert call("numeric", tagged("3.05"), solution=["3"], rel_tol=0.02) == [1.0]


@pytest.mark.parametrize(("pred", "gold", "expected"), [
    (100, 100, 1.0),
    (150, 100, 0.1),   # |d| = 0.50 <= 1 - 0.50 counts (<=, not <): only theta = 0.50
    (105, 100, 1.0),   # 0.05 <= 1 - 0.95
    (110, 100, 0.9),
    (149.9, 100, 0.1),
    (151, 100, 0.0),
    (80, 100, 0.6),    # VSI-Bench's float64 thresholds: 1 - linspace(...)[6] = 0.19999999999999984 < 0.2
    (0, 0, 1.0),
])
def test_mra_thresholds_as_vsi_bench(pred, gold, expected):
    assert mean_relative_accuracy(pred, gold) == pytest.approx(expected)


def test_mra_parses_like_vsi_bench():
    assert vsi_parse_number("3.5") == 3.5 and vsi_parse_number("3.5.") == 3.5
    assert vsi_parse_number("3.5 meters") == 3.5
    assert vsi_parse_number("about 3.5") is None and vsi_parse_number("3.5m") is None
    out = call("mra", tagged("2.0", "about 2", "3", "inf", "nan"), solution=["2", "2", "2.0", "2", "2"])
    assert out == [1.0, 0.0, pytest.approx(0.1), 0.0, 0.0]


def test_temporal_and_bbox_iou():
    assert call("temporal_iou", tagged("[1, 3]", "[2.0, 3.0]", "[3, 1]", "none"), solution=["[1, 3]"] * 4) == \
        [1.0, 0.5, 0.0, 0.0]
    assert call("temporal_iou", tagged("[0, 2]"), solution=[[1.0, 3.0]]) == [pytest.approx(1 / 3)]
    assert call("bbox_iou", tagged("[0, 0, 2, 2]", "[1, 1, 3, 3]", "[5,5,6,6]"), solution=["[0, 0, 2, 2]"] * 3) == \
        [1.0, pytest.approx(1 / 7), 0.0]


def test_yes_no_ocr_free_form():
    assert call("yes_no", tagged("Yes", "no.", "yes and no", "maybe"), solution=["yes", "yes", "yes", "no"]) == \
        [1.0, 0.0, 0.0, 0.0]
    assert call("ocr", tagged("the cat sat", "the cat", ""), solution=["the cat sat"] * 3) == \
        [1.0, pytest.approx(2 / 3), 0.0]
    ff = call("free_form", tagged("a red square appears", "nothing"), solution=["a red square appears"] * 2)
    assert ff[0] == 1.0 and ff[1] == 0.0


def test_relative_accuracy_is_one_minus_clipped_relative_error():
    got = call("relative_accuracy", tagged("8", "10", "25", "none"), solution=["10"] * 4)
    assert got[0] == pytest.approx(0.8) and got[1] == pytest.approx(1.0)
    assert got[2] == 0.0 and got[3] == 0.0  # error above 100% clips; no number scores 0


def test_solutions_written_in_answer_tags_are_unwrapped():
    assert call("accuracy", tagged("3", "4"), solution=["<answer> 3 </answer>"] * 2) == [1.0, 0.0]
    assert call("mcq", tagged("B"), solution=["<answer>B</answer>"], options=[["A. x", "B. y"]]) == [1.0]


def test_free_form_averages_the_requested_rouge_types():
    from rouge_score import rouge_scorer

    pred, ref = "a red square appears on the left", "a red square appears"
    types = ["rouge1", "rouge2", "rougeL"]
    expected = rouge_scorer.RougeScorer(types, use_stemmer=True).score(ref, pred)
    got = call("free_form", tagged(pred), solution=[ref], rouge_types=types)[0]
    assert got == pytest.approx(sum(expected[t].fmeasure for t in types) / 3)
    assert got != pytest.approx(call("free_form", tagged(pred), solution=[ref])[0])


def test_format_overlong_repetition():
    assert call("format", ["<think>a</think><answer>b</answer>", "<answer>b</answer>", "<think>a</think>",
                           "<think><think>a</think><answer>b</answer>"]) == [1.0, 0.0, 0.0, 0.0]
    assert call("format", ["<answer>b</answer>"], require_think=False) == [1.0]
    out = get("overlong")(completions=["a"] * 4, completion_ids=[[0] * n for n in (10, 80, 90, 101)],
                          max_completion_length=100, buffer=20)
    assert out == [0.0, 0.0, -0.5, -1.0]
    with pytest.raises(KeyError, match="needs max_completion_length"):
        get("overlong")(completions=["a"], completion_ids=[[0]])
    rep = call("repetition", ["a b c d e f", "a b c a b c a b c", "short"], ngram_size=3, max_penalty=-1.0)
    assert rep[0] == 0.0 and rep[1] == pytest.approx(-4 / 7) and rep[2] == 0.0


def test_by_problem_type_routes_each_row():
    out = call("by_problem_type", tagged("B", "3", "[1, 3]", "2"),
               solution=["B", "3", "[1, 2]", "4"], options=[["A. x", "B. y"], None, None, None],
               problem_type=["mcq", "counting", "temporal", "regression"], id=["r0", "r1", "r2", "r3"])
    assert out == [1.0, 1.0, 0.5, pytest.approx(0.1)]  # mra: |2 - 4| / 4 = 0.5 passes theta = 0.5 only
    runner = RewardRunner([RewardSpec(name="by_problem_type")])
    with pytest.raises(RewardError, match=r"failed on rows \[r1\].*problem_type 'poetry' has no reward"):
        runner(prompts=[""] * 2, completions=tagged("B", "x"), completion_ids=[[], []], row_ids=["r0", "r1"],
               rows=[{"solution": "B", "problem_type": "mcq", "options": ["A. x", "B. y"]},
                     {"solution": "x", "problem_type": "poetry"}])


def test_missing_column_names_reward_and_column():
    runner = RewardRunner([RewardSpec(name="mra")])
    with pytest.raises(RewardError, match="reward 'mra' failed on rows \\[r0\\].*needs a 'solution' column"):
        runner(prompts=[""], completions=["1"], completion_ids=[[]], rows=[{"question": "q"}], row_ids=["r0"])


def test_none_is_left_out_of_the_weighted_sum():
    runner = RewardRunner([RewardSpec(name="numeric", weight=1.0), RewardSpec(name="format", weight=0.5)])
    batch = runner(prompts=[""] * 2, completions=tagged("3", "3"), completion_ids=[[], []],
                   rows=[{"solution": "3"}, {"solution": None}], row_ids=["a", "b"])
    assert batch.total.tolist() == [1.5, 0.5]


# -- hypothesis: every parser and reward takes any string without raising or hanging ------------------

ADVERSARIAL = st.one_of(
    st.text(max_size=200),
    st.text(alphabet="<>/answerthink[]{}()\\^_0123456789.,- ABCD", max_size=300),
    st.builds(lambda n, s: s * n, st.integers(0, 2000), st.sampled_from(["<answer>", "\\frac{", "9^{", "[", "1,"])),
    st.sampled_from(["", " ", "\x00", "🙂" * 50, "<answer><answer>1</answer></answer>", "1e99999", "-0", "1" * 5000,
                     "\\frac{" * 300 + "1" + "}" * 300, "A" * 10000]),
)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(ADVERSARIAL)
def test_parsers_never_raise(text):
    extract_answer(text)
    first_number(text)
    numbers(text, 4)
    vsi_parse_number(text)


@FAST
@given(ADVERSARIAL, st.sampled_from(["3", "B", "[1, 2]", "[0, 0, 1, 1]", "yes", "the cat"]))
def test_rewards_return_valid_scores_on_any_answer(text, solution):
    completions = [text, f"<answer>{text}</answer>"]
    names = {"3": ["numeric", "mra"], "B": ["mcq"], "[1, 2]": ["temporal_iou"], "[0, 0, 1, 1]": ["bbox_iou"],
             "yes": ["yes_no"], "the cat": ["ocr", "free_form"]}[solution]
    for name in names + ["format", "repetition"]:
        for value in call(name, completions, solution=[solution] * 2):
            assert value is not None and -1.0 <= value <= 1.0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ADVERSARIAL)
def test_accuracy_on_any_answer_is_answered_or_killed_at_its_limit(text):
    """Either math-verify answers within the limit, or the worker running the check is killed (its pid
    is gone) and the answer scores 0. How long checks take is measured in bench/rewards.py."""
    checker = math_check.checker()
    checker.equivalent("$1$", "$1$", 60.0)  # a worker is up (its start-up is not part of any limit)
    worker, killed = checker._process.pid, checker.timeouts
    value = call("accuracy", [f"<answer>{text}</answer>"], solution=["\\frac{1}{2}"], timeout_seconds=2)[0]
    assert value in (0.0, 1.0)
    if checker.timeouts > killed:
        assert value == 0.0 and not psutil.pid_exists(worker)
