"""The Python API: trainers take a recipe as object, dict or path, and a model, processor, datasets and
reward callables as objects; the example in docs/python_api.md runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from r1_mm.config.recipe import ConfigError, load_recipe

from .conftest import REPO


def test_the_documented_example_runs(tmp_path, tiny_cache):
    cells = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "python_api.md").read_text(), flags=re.S)
    assert len(cells) == 3
    script = tmp_path / "notebook.py"
    script.write_text("\n".join(cells))  # a plain script without a __main__ guard, as a notebook runs it
    env = {**os.environ, "R1MM_CACHE": str(tiny_cache.parent)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    rewards = eval(lines[-2])  # the GRPO cell's list of per-step mean rewards, from metrics.jsonl
    assert len(rewards) == 3 and all(0.0 <= r <= 1.0 for r in rewards)
    assert lines[-1].endswith("dpo") and os.path.exists(os.path.join(lines[-1], "metrics.jsonl"))


def test_objects_replace_names(tmp_path, tiny_path, synthetic_data, monkeypatch, tiny_cache):
    """A model object (its weights, not the recipe's model), a Dataset object and a reward callable."""
    import datasets
    import torch
    from transformers import AutoModelForImageTextToText

    import r1_mm.trainers.backend as backend
    from r1_mm import GRPOTrainer

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))

    def no_loading(*args, **kwargs):
        raise AssertionError("the recipe's model was loaded although a model object was given")

    monkeypatch.setattr(backend, "load_model", no_loading)
    folder = tiny_path("qwen2_5_vl", small=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # these weights exist only in the object
    seen = []

    def my_reward(completions, solution, **_):
        seen.append(len(completions))
        return [float(c.strip() == str(s)) for c, s in zip(completions, solution)]

    rows = datasets.load_dataset("json", data_files=str(synthetic_data["counting"]), split="train")
    cfg = load_recipe(None, [f"training.output_dir={tmp_path / 'run'}", f"data.media_root={synthetic_data['counting'].parent}",
                             "data.format_instruction=null", "media.max_pixels=3136", "media.min_pixels=3136",
                             "rollout.num_generations=2", "rollout.max_completion_length=3", "training.max_steps=1",
                             "training.prompts_per_step=2", "logging.progress_bar=false", "algorithm.grpo.beta=0.1"])
    trainer = GRPOTrainer(cfg, model=model, train_dataset=rows, reward_funcs=[my_reward])
    assert trainer.learner.unwrapped is model  # the object itself is trained
    with backend.reference_model(trainer.learner) as ref:  # the reference is a copy of the object as given
        assert torch.equal(ref.lm_head.weight, model.lm_head.weight)
    trainer.train()
    assert seen == [4] and trainer.cfg.model.name_or_path == str(folder)
    assert "rewards/my_reward/mean" in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_object_errors_are_one_line(tmp_path, tiny_cache, monkeypatch):
    from r1_mm import GRPOTrainer

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    with pytest.raises(ConfigError, match="a reward without a name"):
        GRPOTrainer({"training": {"output_dir": str(tmp_path)}}, reward_funcs=[lambda completions, **_: [0.0]])
    def again(completions, **_):
        return [0.0] * len(completions)

    from r1_mm.rewards.registry import REGISTRY
    from r1_mm.trainers.objects import RunObjects, with_objects

    def again_edited(completions, **_):
        return [1.0] * len(completions)

    first = with_objects({"training": {"output_dir": str(tmp_path)}}, RunObjects(reward_funcs={"cell": again}))
    redefined = with_objects({"training": {"output_dir": str(tmp_path)}},  # the notebook cell, edited and run again
                             RunObjects(reward_funcs={"cell": again_edited}))
    assert [f.name for f in first.rewards.functions] == [f.name for f in redefined.rewards.functions] == ["cell"]
    assert REGISTRY.get("cell") is again_edited
    with pytest.raises(ConfigError, match="'numeric' is already a reward"):
        GRPOTrainer({"training": {"output_dir": str(tmp_path)}}, reward_funcs={"numeric": len})
    with pytest.raises(ConfigError, match="rollout.engine: must be one of|is not an engine"):
        GRPOTrainer({"rollout": {"engine": "vlm"}, "training": {"output_dir": str(tmp_path)}}, reward_funcs={"r": len})
