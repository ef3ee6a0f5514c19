"""The colocated engine's sleep choreography on GPU: level-2 sleep (weights and KV cache discarded, no
host copies), a sync wakes the weights alone, the KV cache wakes only for generation, and a rollout
that follows a sleep without a sync reloads the policy's weights first (level 2 leaves none).

Sleep mode exists only on CUDA, so the vLLM engine here is a recording stand-in and CUDA is reported
available (both mocks, for what cannot exist on this machine); the engine code, the policy's weight
stream and the prompts are real."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from r1_mm.config.recipe import DataConfig, MediaConfig, load_recipe
from r1_mm.data import PromptBuilder
from r1_mm.data.loading import default_media_root, read_rows
from r1_mm.rollout.base import SamplingSettings


class InprocClient:
    """Named as vLLM's in-process engine-core client: the stand-in's worker runs in this process, as with
    the colocated engine's default executors (rollout/reload.py reads the class name)."""


class RecordingLLM:
    calls: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        parallel = SimpleNamespace(distributed_executor_backend="uni")
        self.llm_engine = SimpleNamespace(reset_encoder_cache=lambda: None, engine_core=InprocClient(),
                                          vllm_config=SimpleNamespace(parallel_config=parallel))
        RecordingLLM.calls = []

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags) if tags else None))

    def collective_rpc(self, method, args=(), kwargs=None):
        """A worker-side reload: r1-mm sends a function and the weight stream (rollout/reload.py)."""
        weights = args[0] if args else (kwargs or {})["weights_iterator"]
        names = [name for name, _ in weights]  # consume the stream as vLLM does
        assert names
        self.calls.append(("reload_weights", len(names)))

    def reset_prefix_cache(self):
        pass

    def reset_mm_cache(self):
        pass

    def generate(self, requests, params, use_tqdm=False):
        self.calls.append(("generate", len(requests)))
        completion = SimpleNamespace(token_ids=[5, 6], logprobs=None, finish_reason="stop")
        return [SimpleNamespace(outputs=[completion] * p.n, prompt_token_ids=[1, 2, 3]) for p in params]


@pytest.fixture
def engine(tiny_path, synthetic_data, monkeypatch):
    import vllm

    from r1_mm.rollout.vllm_colocate import VLLMColocateEngine

    monkeypatch.setattr(vllm, "LLM", RecordingLLM)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    path = tiny_path("qwen2_5_vl")
    cfg = load_recipe(None, [f"model.name_or_path={path}", "rollout.engine=vllm_colocate"])
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    data = synthetic_data["counting"]
    builder = PromptBuilder(processor, DataConfig(), MediaConfig(), default_media_root(data))
    batch = [builder.prepare(row, i) for i, row in enumerate(read_rows(data)[:2])]
    return VLLMColocateEngine(model, processor, cfg), model, batch


def test_level_two_sleep_weights_then_kv_cache(engine):
    eng, model, batch = engine
    sampling = SamplingSettings(max_tokens=2, temperature=1.0, seed=0)
    eng.generate(batch, 2, sampling)
    eng.update_weights(model)
    eng.generate(batch, 2, sampling)
    eng.generate(batch, 2, sampling)  # no sync since the last sleep: the weights are reloaded first
    calls = RecordingLLM.calls
    reload = ("reload_weights", calls[2][1])
    assert calls == [
        ("sleep", 2), ("wake_up", ("weights",)), reload,                    # start: the policy's weights
        ("wake_up", ("kv_cache",)), ("generate", 2), ("sleep", 2),          # rollout 1
        ("wake_up", ("weights",)), reload,                                  # sync after the update
        ("wake_up", ("kv_cache",)), ("generate", 2), ("sleep", 2),          # rollout 2
        ("wake_up", ("weights",)), reload,                                  # rollout 3 reloads first
        ("wake_up", ("kv_cache",)), ("generate", 2), ("sleep", 2),
    ]
    assert reload[1] >= len(list(model.state_dict()))  # every weight (tied ones under each name)
