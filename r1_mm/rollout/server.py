"""``r1-mm serve rollout``: one vLLM engine behind a small HTTP API for the ``vllm_pool`` engine.

Endpoints: ``POST /generate`` (samples with raw media in, token ids + sampling logprobs out),
``POST /update_weights`` (reload from a folder of safetensors the learner wrote to shared memory),
``GET /health`` (model and weights version). vLLM's OpenAI server cannot take raw video frames,
hence this server; it keeps vLLM's engine, batching and kernels as they are.
"""

from __future__ import annotations

import argparse
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


def read_weights(folder: str) -> Any:
    """(name, tensor) pairs from every safetensors file in ``folder``, one tensor at a time."""
    from pathlib import Path

    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, handle.get_tensor(name)


def build_app(llm: Any, model_name: str) -> Any:
    from fastapi import FastAPI, HTTPException
    from vllm import SamplingParams

    from r1_mm.rollout.transport import decode_request
    from r1_mm.rollout.vllm_common import engine_info, reset_caches
    from r1_mm.rollout.vllm_common import generate as seeded_generate

    app = FastAPI(title="r1-mm rollout server")
    lock = threading.Lock()  # one engine: generate and reload never overlap
    state = {"weights_version": 0}

    workers = llm.llm_engine.vllm_config.parallel_config.world_size_across_dp

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "model": model_name, "weights_version": state["weights_version"], "workers": workers,
                **engine_info(llm)}

    @app.post("/generate")
    def generate(body: dict[str, Any]) -> dict[str, Any]:
        try:
            requests = [decode_request(p) for p in body["prompts"]]
            params = [{**p, "logit_bias": {int(k): v for k, v in (p.get("logit_bias") or {}).items()} or None}
                      for p in body["sampling"]]
            for p in params:
                SamplingParams(**p)  # a bad field is the client's error (400), found before sampling
        except (KeyError, TypeError, ValueError) as exc:
            raise HTTPException(400, f"bad generate request: {exc}") from exc
        with lock:
            outputs = seeded_generate(llm, requests, params)
        return {"weights_version": state["weights_version"], "outputs": [{
            "prompt_token_ids": list(o.prompt_token_ids),
            "completions": [{"token_ids": list(c.token_ids), "finish_reason": c.finish_reason,
                             "logprobs": None if c.logprobs is None else
                             [float(step[t].logprob) for step, t in zip(c.logprobs, c.token_ids, strict=True)]}
                            for c in o.outputs]} for o in outputs]}

    @app.post("/open_weight_channel")
    def open_weight_channel(body: dict[str, Any]) -> dict[str, Any]:
        """Join the learner's broadcast group (blocks until every member has joined)."""
        with lock:
            ranks = llm.collective_rpc("r1mm_open_channel", kwargs={
                "host": body["host"], "port": int(body["port"]), "world_size": int(body["world_size"]),
                "rank_offset": int(body["rank_offset"])})
        return {"ranks": ranks}

    @app.post("/update_weights_broadcast")
    def update_weights_broadcast(body: dict[str, Any]) -> dict[str, Any]:
        """Receive the tensors named in ``specs`` over the broadcast group and load them in place."""
        with lock:
            llm.collective_rpc("r1mm_receive_weights", kwargs={"specs": body["specs"]})
            reset_caches(llm)
            state["weights_version"] = int(body.get("version", state["weights_version"] + 1))
        return {"weights_version": state["weights_version"]}

    @app.post("/update_weights")
    def update_weights(body: dict[str, Any]) -> dict[str, Any]:
        with lock:
            # an iterator, not weights_path: that would also repoint vLLM's processor at the weights folder
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": read_weights(body["path"]),
                                                         "is_checkpoint_format": True})
            reset_caches(llm)
            state["weights_version"] = int(body.get("version", state["weights_version"] + 1))
        return {"weights_version": state["weights_version"]}

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="r1-mm serve rollout", description="A vLLM rollout server for the vllm_pool engine.")
    p.add_argument("--model", required=True, help="path, hub id or tiny:... name (the policy's starting weights)")
    p.add_argument("--host", default="127.0.0.1", help="loopback unless you need otherwise: there is no auth")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-images", type=int, default=8)
    p.add_argument("--max-videos", type=int, default=1)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--data-parallel-size", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    import uvicorn

    from r1_mm.config import ModelConfig
    from r1_mm.models import resolve_model_path
    from r1_mm.rollout.vllm_common import set_cpu_defaults

    set_cpu_defaults()
    from vllm import LLM

    kwargs: dict[str, Any] = dict(model=resolve_model_path(ModelConfig(name_or_path=args.model)), dtype=args.dtype,
                                  max_model_len=args.max_model_len, seed=args.seed,
                                  limit_mm_per_prompt={"image": args.max_images, "video": args.max_videos},
                                  logprobs_mode="processed_logprobs", tensor_parallel_size=args.tensor_parallel_size,
                                  data_parallel_size=args.data_parallel_size,
                                  worker_extension_cls="r1_mm.rollout.weight_channel.WeightReceiverExtension")
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        kwargs["enforce_eager"] = True
    llm = LLM(**kwargs)
    uvicorn.run(build_app(llm, args.model), host=args.host, port=args.port, log_level="warning")
    return 0
