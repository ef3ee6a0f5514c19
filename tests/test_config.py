import subprocess
import sys

import pytest

from r1_mm.config.recipe import ConfigError, RecipeConfig, apply_overrides, load_recipe

from .conftest import REPO


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_load_and_overrides_apply(tmp_path):
    path = write(tmp_path, "rollout:\n  num_generations: 8\nalgorithm:\n  grpo:\n    beta: 0.1\n")
    cfg = load_recipe(path, ["algorithm.grpo.beta=0", "media.max_frames=32", "logging.report_to=[wandb]",
                             "algorithm.grpo.epsilon_high=0.28"])
    assert isinstance(cfg, RecipeConfig)
    assert cfg.rollout.num_generations == 8
    assert cfg.algorithm.grpo.beta == 0.0 and isinstance(cfg.algorithm.grpo.beta, float)
    assert cfg.media.max_frames == 32
    assert cfg.logging.report_to == ["wandb"]
    assert cfg.algorithm.grpo.epsilon_high == 0.28


def test_unknown_key_names_field_and_suggests(tmp_path):
    path = write(tmp_path, "rollout:\n  num_generation: 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'rollout.num_generation'.*did you mean 'num_generations'"):
        load_recipe(path)
    with pytest.raises(ConfigError, match=r"unknown key 'algoritm'.*did you mean 'algorithm'"):
        load_recipe(None, ["algoritm.beta=0.1"])


def test_wrong_types_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout.num_generations: expected an integer, got 'eight'"):
        load_recipe(None, ["rollout.num_generations=eight"])
    with pytest.raises(ConfigError, match=r"algorithm.grpo.scale_rewards: must be one of .*'grop'"):
        load_recipe(None, ["algorithm.grpo.scale_rewards=grop"])
    with pytest.raises(ConfigError, match=r"model.lora: expected true/false"):
        load_recipe(None, ["model.lora=3"])
    with pytest.raises(ConfigError, match=r"logging.report_to: expected a list"):
        load_recipe(None, ["logging.report_to=wandb"])
    with pytest.raises(ConfigError, match=r"training.learning_rate: expected a number, got 'fast'"):
        load_recipe(None, ["training.learning_rate=fast"])


def test_exponent_floats_without_dot(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-5` as a string; researchers write it that way all the time."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  learning_rate: 1e-5\n")
    assert load_recipe(recipe).training.learning_rate == 1e-5
    assert load_recipe(None, ["algorithm.grpo.beta=4e-2"]).algorithm.grpo.beta == 0.04


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="min_frames must be <= media.max_frames"):
        load_recipe(None, ["media.min_frames=10", "media.max_frames=4"])
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        load_recipe(None, ["rollout.num_generations=1"])


def test_reward_specs_accept_names_and_mappings():
    cfg = load_recipe(None, ["rewards.functions=[accuracy, {name: format, weight: 0.5}]"])
    assert [(f.name, f.weight) for f in cfg.rewards.functions] == [("accuracy", 1.0), ("format", 0.5)]


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_overrides({}, ["algorithm.grpo.beta"])


def test_recipe_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def _print_config(cmd, tmp_path):
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
def test_same_resolution_under_cli_and_accelerate_launch(tmp_path):
    """`r1-mm train` and `accelerate launch -m r1_mm.train` resolve a recipe identically."""
    recipe = REPO / "recipes" / "demo_rollout.yaml"
    overrides = ["algorithm.grpo.beta=0.02", "rollout.num_generations=6"]
    bin_dir = __import__("pathlib").Path(sys.executable).parent
    via_cli = _print_config([str(bin_dir / "r1-mm"), "train", str(recipe), *overrides, "--print-config"], tmp_path)
    via_accelerate = _print_config(
        [str(bin_dir / "accelerate"), "launch", "--num_processes", "1", "--cpu", "-m", "r1_mm.train",
         str(recipe), *overrides, "--print-config"], tmp_path)
    assert "num_generations: 6" in via_cli and "beta: 0.02" in via_cli
    assert via_cli == via_accelerate


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    from r1_mm.config.algorithms import ALGORITHMS

    cfg = load_recipe(path)
    assert cfg.algorithm.name in ALGORITHMS.names()


def test_extends_deep_merges_over_the_base_and_rejects_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {name_or_path: tiny:qwen2_vl, lora: true}\nalgorithm: {grpo: {beta: 0.1}}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nmodel: {name_or_path: tiny:qwen2_5_vl}\n")
    cfg = load_recipe(tmp_path / "child.yaml", ["algorithm.grpo.beta=0.2"])
    assert cfg.model.name_or_path == "tiny:qwen2_5_vl" and cfg.model.lora is True  # merged, not replaced
    assert cfg.algorithm.grpo.beta == 0.2
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "c.yaml")


def test_vllm_context_must_hold_the_longest_allowed_prompt_and_completion():
    with pytest.raises(ConfigError, match=r"rollout.vllm_max_model_len \(2048\) is below .* \(2112\)"):
        load_recipe(None, ["rollout.engine=vllm_colocate", "rollout.vllm_max_model_len=2048",
                           "data.max_prompt_length=2048", "rollout.max_completion_length=64"])
    load_recipe(None, ["rollout.engine=hf", "rollout.vllm_max_model_len=2048", "data.max_prompt_length=2048"])


def test_length_bonus_must_name_a_configured_reward():
    with pytest.raises(ConfigError, match=r"algorithm.grpo.length_bonus_reward 'accuracy' must name one of rewards.functions"):
        load_recipe(None, ["algorithm.grpo.length_bonus=0.2", "rewards.functions=[numeric]"])
    load_recipe(None, ["algorithm.grpo.length_bonus=0.2", "rewards.functions=[accuracy]"])
