"""The algorithm table (config/algorithms.py) and the trainer registry name the same algorithms, and the
recipe's algorithm.name choices are exactly those; what each entry says is what the checks enforce."""

from __future__ import annotations

import typing

import pytest

from r1_mm.config.algorithms import ALGORITHMS, algorithm_spec
from r1_mm.config.recipe import AlgorithmConfig, ConfigError, RecipeConfig


def test_every_algorithm_has_a_trainer_and_a_recipe_name():
    import r1_mm.trainers  # noqa: F401  (registers the trainers)
    from r1_mm.trainers.registry import TRAINERS

    names = typing.get_args(typing.get_type_hints(AlgorithmConfig)["name"])
    assert sorted(ALGORITHMS.names()) == sorted(TRAINERS.names() if hasattr(TRAINERS, "names") else TRAINERS) == sorted(names)


def test_unknown_algorithm_is_refused_with_the_closest_name():
    with pytest.raises(ValueError, match="did you mean 'grpo'"):
        algorithm_spec("gpro")


@pytest.mark.parametrize("name", ["grpo", "iterative_dpo"])
def test_algorithms_that_sample_refuse_greedy_sampling(name):
    assert algorithm_spec(name).samples_while_training
    with pytest.raises(ConfigError, match="temperature"):
        RecipeConfig.from_dict({"algorithm": {"name": name}, "rollout": {"temperature": 0}})


@pytest.mark.parametrize("name", ["dpo", "tpo"])
def test_algorithms_on_given_pairs_take_greedy_settings(name):
    assert not algorithm_spec(name).samples_while_training and algorithm_spec(name).pairs_in_rows
    RecipeConfig.from_dict({"algorithm": {"name": name}, "rollout": {"temperature": 0}})


def test_groups_need_two_generations():
    assert algorithm_spec("grpo").groups and not algorithm_spec("dpo").groups
    with pytest.raises(ConfigError, match="num_generations"):
        RecipeConfig.from_dict({"algorithm": {"name": "grpo"}, "rollout": {"num_generations": 1}})
    RecipeConfig.from_dict({"algorithm": {"name": "dpo"}, "rollout": {"num_generations": 1}})


@pytest.mark.parametrize(("override", "where"), [
    ("algorithm.epsilon=0.3", r"'algorithm.epsilon': it belongs under algorithm.grpo \(algorithm.grpo.epsilon\)"),
    ("algorithm.dpo_beta=0.3", r"'algorithm.dpo_beta': it belongs under algorithm.dpo \(algorithm.dpo.beta\)"),
    ("algorithm.grpo.nll_weight=1", r"'algorithm.grpo.nll_weight': it belongs under algorithm.dpo"),
    ("algorithm.dpo.round_prompts=4", r"'algorithm.dpo.round_prompts': it belongs under algorithm.iterative_dpo"),
])
def test_a_key_in_the_wrong_place_says_where_it_belongs(override, where):
    from r1_mm.config.recipe import load_recipe

    with pytest.raises(ConfigError, match=where):
        load_recipe(None, [override])


def test_each_section_is_read_by_its_algorithm_only():
    """The sections split the old bag of fields without loss: every old key lives in exactly one section (fields
    added since, like the newer losses' knobs, were never flat keys)."""
    import dataclasses

    from r1_mm.config.recipe import MOVED_ALGORITHM_KEYS

    hints = typing.get_type_hints(AlgorithmConfig)
    sections = [name for name in hints if name != "name"]
    seen = [f"{s}.{f.name}" for s in sections for f in dataclasses.fields(hints[s])]
    assert set(MOVED_ALGORITHM_KEYS.values()) <= set(seen)
    assert len(set(MOVED_ALGORITHM_KEYS.values())) == len(MOVED_ALGORITHM_KEYS)  # no two old keys share one field
