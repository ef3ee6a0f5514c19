"""Jobs without a learner (r1-mm rollout, tpo build, eval) put the hf engine's model on the GPU.

They once left it on the CPU: a GPU machine sampled on its CPU. No CUDA device exists here, so the
device is a stand-in (the 'meta' device, which any module can move to) returned by the one function
that chooses it; what is tested is that every job moves its model to that device before sampling, and
that a vLLM engine's job leaves its host copy where it is."""

from __future__ import annotations

import pytest
import torch

from r1_mm.config.recipe import load_recipe
from r1_mm.models import loading as models

STAND_IN = torch.device("meta")


class EngineReached(Exception):
    def __init__(self, model):
        self.device = next(model.parameters()).device


def stop_at_engine(name=None, *, model=None, **_):
    raise EngineReached(model)


def recipe(tiny_path, synthetic_data, tmp_path, engine):
    return load_recipe(None, [f"model.name_or_path={tiny_path('qwen2_5_vl')}",
                              f"data.train_path={synthetic_data['counting']}", f"training.output_dir={tmp_path / 'run'}",
                              f"rollout.engine={engine}", "training.max_steps=1", "rollout.num_generations=2",
                              "training.prompts_per_step=1"])


def test_inference_device_is_the_local_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # stand-in: no CUDA here
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert models.inference_device() == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.inference_device() == torch.device("cpu")


@pytest.mark.parametrize("engine, expected", [("hf", STAND_IN), ("vllm_colocate", torch.device("cpu"))])
@pytest.mark.parametrize("job", ["rollout", "tpo", "eval"])
def test_jobs_move_the_hf_engines_model_to_the_device(tiny_path, synthetic_data, tmp_path, monkeypatch, job,
                                                     engine, expected):
    import r1_mm.jobs.rollout
    import r1_mm.rollout

    monkeypatch.setattr(models, "inference_device", lambda: STAND_IN)
    monkeypatch.setattr(r1_mm.rollout, "make_engine", stop_at_engine)
    monkeypatch.setattr(r1_mm.jobs.rollout, "make_engine", stop_at_engine)
    cfg = recipe(tiny_path, synthetic_data, tmp_path, engine)
    with pytest.raises(EngineReached) as reached:
        if job == "rollout":
            r1_mm.jobs.rollout.run_rollouts(cfg)
        elif job == "tpo":
            from r1_mm.jobs.build_tpo import build_tpo_pairs

            build_tpo_pairs(cfg, tmp_path / "pairs.jsonl")
        else:
            from r1_mm.jobs.evaluate import evaluate_checkpoint

            evaluate_checkpoint(cfg, tiny_path("qwen2_5_vl"))
    assert reached.value.device == expected
