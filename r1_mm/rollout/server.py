"""``r1-mm serve rollout``: one vLLM engine behind a small HTTP API for the ``vllm_pool`` engine.

Endpoints: ``POST /generate`` (samples with raw media in, token ids + sampling logprobs out; a prompt is text,
or token ids with its media placeholders unexpanded for a tool trajectory's next turn, and the reply's
``prompt_token_ids`` are vLLM's, placeholders expanded, for the client to check against its own),
``POST /score`` (a served distillation teacher: per prompt, the logprob the model gives each token of the
completions sent after it, from vLLM's ``prompt_logprobs``; see ``score`` below),
``POST /update_weights`` (reload from a folder of safetensors the learner wrote to shared memory),
``POST /load_adapter`` (a server started with ``--enable-lora``: the policy's PEFT adapter, in the body, loaded as a
new LoRA version; the previous version stays loaded beside it, for requests of learner ranks that have not switched
yet, older ones are removed; a generate request names the adapter it wants and is refused with 409 when the server
holds neither), ``GET /health`` (model, weights version, the LoRA state, and whether the engine still
works). vLLM's OpenAI server
cannot take raw video frames, hence this server; it keeps vLLM's engine, batching and kernels as they are.

What a learner (or anything else that can reach the port) sends is checked before it touches the
engine: weight updates must name the model's own tensors with their shapes, a failed reload restores
the last good weights (or the server says it is broken), bodies are size-limited, media must be
pixel arrays of the right form, and with an API key every request must carry it.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import logging
import os
import shutil
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

from r1_mm.rollout.request_checks import BadRequest, PromptLimits, check_generate, check_score

log = logging.getLogger(__name__)

API_KEY_ENV = "R1MM_ROLLOUT_API_KEY"  # the key never travels in argv (ps would show it) or in a log line


def safetensors_specs(folder: Path) -> dict[str, list[int]]:
    """Tensor names and shapes of every safetensors file in ``folder``, from the headers alone."""
    specs: dict[str, list[int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > 100 * 2**20:
                raise BadRequest(422, f"{file.name}: safetensors header of {size} bytes")
            header = json.loads(handle.read(size))
        specs.update({name: list(meta["shape"]) for name, meta in header.items() if name != "__metadata__"})
    return specs


def expected_specs(model_dir: Path) -> dict[str, list[int]]:
    """What an update may contain: the tensors in the checkpoint's names and layouts (its files, and the
    model built on the meta device from config.json through transformers' reverse conversion, as a
    learner sends them: models/weights.py), transformers' in-memory names where they differ, and an LM
    head tied to the embeddings under its own name, as the learner sends it. A name both formats use keeps
    the checkpoint's shape: Qwen3-VL-MoE's experts are stored transposed, and vLLM's loader reads that."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from r1_mm.models.weights import policy_weight_specs

    specs = safetensors_specs(model_dir)
    with torch.device("meta"):
        meta = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir))
    specs.update({name: shape for name, shape, _ in policy_weight_specs(meta)})
    for name, p in meta.state_dict(keep_vars=True).items():
        specs.setdefault(name, list(p.shape))
    embed = next((n for n in specs if n.endswith("embed_tokens.weight")), None)
    if embed is not None and "lm_head.weight" not in specs:
        specs["lm_head.weight"] = specs[embed]
    return specs


def check_adapter(body: Any, max_rank: int) -> tuple[int, dict[str, Any], bytes]:
    """A ``/load_adapter`` body: its version (the LoRA id, > 0), the PEFT ``adapter_config.json`` and the
    ``adapter_model.safetensors`` bytes, whose tensors must all be PEFT LoRA weights, of a rank the engine takes."""
    if not isinstance(body, dict) or not isinstance(body.get("config"), dict) or not isinstance(body.get("safetensors"), str):
        raise BadRequest(400, "load_adapter needs 'version', 'config' (adapter_config.json) and 'safetensors' (base64)")
    version = body.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BadRequest(400, f"load_adapter: 'version' must be an integer >= 1, not {version!r}")
    rank = body["config"].get("r")
    if not isinstance(rank, int) or not 0 < rank <= max_rank:
        raise BadRequest(422, f"adapter rank {rank!r}: this server takes LoRA ranks up to {max_rank} (--max-lora-rank)")
    try:
        data = base64.b64decode(body["safetensors"], validate=True)
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
    except Exception as exc:
        raise BadRequest(400, f"load_adapter: 'safetensors' is not base64 safetensors ({type(exc).__name__})") from None
    names = [n for n in header if n != "__metadata__"]
    if not names or any("lora_" not in n or not n.startswith("base_model.model.") for n in names):
        raise BadRequest(422, f"load_adapter: tensors must be PEFT LoRA weights (base_model.model....lora_A/B), got "
                              f"{[n for n in names if 'lora_' not in n][:3] or names[:3]}")
    return version, body["config"], data


def serves_tower_lora(worker: Any) -> bool:
    """On a vLLM worker: whether its LoRA manager applies adapters to the vision tower and connector."""
    return bool(worker.model_runner.lora_manager.supports_tower_connector_lora())


def check_update(folder: Path, expected: dict[str, list[int]]) -> None:
    if not folder.is_dir():
        raise BadRequest(422, f"weights path {folder} is not a folder on this host")
    sent = safetensors_specs(folder)
    if not sent:
        raise BadRequest(422, f"weights path {folder} holds no safetensors files")
    if not expected:
        return
    unknown = sorted(set(sent) - set(expected))
    if unknown:
        raise BadRequest(422, f"weights name {len(unknown)} tensor(s) this model does not have, e.g. {unknown[:3]}")
    wrong = [(n, s, expected[n]) for n, s in sent.items() if s != expected[n]]
    if wrong:
        name, got, want = wrong[0]
        raise BadRequest(422, f"{len(wrong)} tensor(s) have the wrong shape, e.g. {name}: {got} instead of {want}")


class SizeLimit:
    """ASGI middleware: bodies over ``limit`` bytes get 413 (declared or streamed)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and int(declared) > self.limit:
            return await _reject(send, 413, f"request body over {self.limit} bytes (serve rollout --max-request-mb)")
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BadRequest(413, f"request body over {self.limit} bytes")
            return message

        try:
            await self.app(scope, limited, send)
        except BadRequest as exc:
            await _reject(send, exc.status, str(exc))


async def _reject(send: Any, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def build_app(llm: Any, model_name: str, *, model_dir: Path | None = None, api_key: str | None = None,
              max_request_bytes: int = 2**30, batching: bool = True, processor: Any = None) -> Any:
    """``batching``: concurrent generate requests join the engine's running batch (batching.py); off,
    they run one after the other (on CPU, sampling is then reproducible whatever the timing). ``processor``:
    the model's, as the learner loads it; a family whose vLLM model has no video modality needs it to send
    videos (``vllm_common.video_presenter``)."""
    import torch
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from r1_mm.core.cpu_cores import allowed_cores
    from r1_mm.rollout.batching import ContinuousBatcher, RequestRejected
    from r1_mm.rollout.reload import reload_folder_in_place, workers_in_process
    from r1_mm.rollout.transport import decode_request, tokenizer_fingerprint
    from r1_mm.rollout.vllm_common import (
        engine_info,
        engine_params,
        processor_kwargs,
        reset_caches,
        seed_engine_stream,
        video_presenter,
    )
    from r1_mm.rollout.weight_channel import DEFAULT_TIMEOUT_S

    app = FastAPI(title="r1-mm rollout server")
    lock = threading.Lock()  # one engine: generate and reload never overlap
    # adapters: the loaded LoRA versions by name, oldest first (the current one and the one before it)
    state: dict[str, Any] = {"weights_version": 0, "broken": None, "last_good": model_dir, "weight_reloads": 0,
                             "adapter": None, "adapters": {}, "adapter_loads": 0, "loaded_ids": [],
                             "score_requests": 0, "scored_tokens": 0}
    lora_config = llm.llm_engine.vllm_config.lora_config  # None: started without --enable-lora
    # vLLM only warns and drops the vision adapters of a model without tower LoRA: the learner checks this
    tower_lora = bool(lora_config is not None and lora_config.enable_tower_connector_lora
                      and all(llm.collective_rpc(serves_tower_lora)))
    adapter_root = Path(tempfile.mkdtemp(prefix="r1mm_server_lora_")) if lora_config is not None else None
    if adapter_root is not None:
        import atexit

        atexit.register(shutil.rmtree, adapter_root, ignore_errors=True)

    def lora_for(name: str | None) -> Any:
        """The LoRARequest a generate request names (None: the base weights); called under the engine lock."""
        if name is None:
            return None
        if name not in state["adapters"]:
            raise BadRequest(409, f"the request names adapter {name!r} but this server holds "
                                  f"{list(state['adapters']) or 'none'}")
        return state["adapters"][name]

    batcher = ContinuousBatcher(llm, lock, to_params=engine_params, seed_engine=lambda seeds: seed_engine_stream(seeds, llm),
                                enabled=batching, lora_for=lora_for)
    expected = expected_specs(model_dir) if model_dir is not None else {}
    limits = PromptLimits.of(llm)
    tokenizer = llm.get_tokenizer()
    fingerprint = tokenizer_fingerprint(tokenizer)
    workers = llm.llm_engine.vllm_config.parallel_config.world_size_across_dp
    in_process = workers_in_process(llm)
    mm_kwargs = processor_kwargs(llm.llm_engine.vllm_config.model_config.hf_config)
    present_video = None if processor is None else video_presenter(llm.llm_engine.vllm_config.model_config.hf_config,
                                                                    processor)

    @app.exception_handler(BadRequest)
    async def client_error(request: Request, exc: BadRequest) -> Any:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse({"detail": "missing or wrong API key (Authorization: Bearer ...)"}, status_code=401)
        return await call_next(request)

    def usable() -> None:
        if state["broken"]:
            raise BadRequest(503, f"engine broken: {state['broken']}")

    def reload(folder: Path) -> None:
        # the folder's path, which every worker reads itself: it pickles for vLLM's multiprocess executor
        # (a stream of tensors does not); our own argument, not vLLM's weights_path, which would also
        # repoint vLLM's processor at the weights folder. Called under the engine lock; the worker
        # synchronises its device before returning (reload.reload_worker), so the lock is released only
        # once the copies this HTTP thread queued on its own CUDA stream are done
        reload_folder_in_place(llm, folder)
        reset_caches(llm)
        state["weight_reloads"] += 1

    @app.get("/health")
    def health() -> Any:
        body = {"ok": state["broken"] is None, "model": model_name, "weights_version": state["weights_version"],
                "workers": workers, "workers_in_process": in_process, "error": state["broken"], "batching": batching,
                "max_model_len": limits.max_model_len,
                "batches": dict(batcher.stats), "weight_reloads": state["weight_reloads"],
                "tokenizer": fingerprint, "score_requests": state["score_requests"],
                # where this process runs (rollout.pool_cpu_cores pins it; on GPU machines: every core)
                "cpu_cores": sorted(allowed_cores()), "torch_threads": torch.get_num_threads(),
                "scored_tokens": state["scored_tokens"],
                "lora": None if lora_config is None else {
                    "max_lora_rank": lora_config.max_lora_rank, "tower_connector_lora": tower_lora,
                    "adapter": None if state["adapter"] is None else state["adapter"].lora_name,
                    "adapter_version": None if state["adapter"] is None else state["adapter"].lora_int_id,
                    # vLLM's own list of loaded LoRA ids, read after the last load (under the engine lock)
                    "adapter_loads": state["adapter_loads"], "loaded_ids": state["loaded_ids"]},
                **engine_info(llm)}
        return JSONResponse(body, status_code=200 if state["broken"] is None else 503)

    @app.post("/generate")
    def generate(body: dict[str, Any]) -> dict[str, Any]:
        usable()
        prompts, params = check_generate(body, limits)  # the client's mistakes: 4xx, the engine never sees them
        try:
            requests = [decode_request(p, mm_kwargs, present_video) for p in prompts]
        except ValueError as exc:  # e.g. token ids with a video for a model whose videos go as images (from text)
            raise BadRequest(400, str(exc)) from None
        adapter = body.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            raise BadRequest(400, "'adapter' must be the name of the loaded LoRA adapter")
        if adapter is not None and lora_config is None:
            raise BadRequest(409, f"the request names adapter {adapter!r} but this server runs without --enable-lora")
        try:
            outputs = batcher.submit(requests, params, adapter)
        except BadRequest:  # the adapter it names is not the one loaded
            raise
        except RequestRejected as exc:  # vLLM's input processing refused one prompt: only this request fails
            raise BadRequest(400, str(exc)) from None
        except Exception as exc:
            state["broken"] = f"generate failed: {type(exc).__name__}: {exc}"
            log.exception("engine failed during generate; the server now reports itself broken")
            raise BadRequest(503, state["broken"]) from None
        return {"weights_version": state["weights_version"], "adapter": adapter, "outputs": [{
            "prompt_token_ids": list(o.prompt_token_ids),
            "completions": [{"token_ids": list(c.token_ids), "finish_reason": c.finish_reason,
                             "logprobs": None if c.logprobs is None else
                             [float(step[t].logprob) for step, t in zip(c.logprobs, c.token_ids, strict=True)]}
                            for c in o.outputs]} for o in outputs]}

    @app.post("/score")
    def score(body: dict[str, Any]) -> dict[str, Any]:
        """The served model's logprob of every completion token, for a distillation teacher.

        Body: ``prompts`` (as ``/generate``'s: text or token ids with unexpanded placeholders, and the media),
        ``completions`` (per prompt, a list of token-id lists) and ``top_k`` (0 by default). Each completion runs as
        one vLLM request of prompt ids + completion ids (a text prompt tokenised as vLLM's renderer tokenises it)
        with ``max_tokens=1`` and ``prompt_logprobs=top_k``; the reply gives, per completion, the logprob of each of
        its tokens (and with ``top_k`` the k most likely ``[id, logprob]`` at each position), and per prompt the
        prompt's ids as vLLM expanded them, for the client to check against its own.

        What the numbers are (vLLM 0.32, ``v1/worker/gpu_model_runner.py`` ``_get_prompt_logprobs_dict``): the
        model's ``compute_logits`` at each prompt position, then ``Sampler.compute_logprobs``, a float32
        ``log_softmax`` over the model's whole vocabulary; prompt positions skip every sampling processor (no
        temperature, penalty, logit bias or top-p/top-k, whatever ``logprobs_mode`` says): the raw model's
        distribution at temperature 1, as a local teacher's ``log_softmax(logits)``.

        Media: the completions of one prompt are added together, and vLLM shares an image's processed inputs and
        vision-encoder embeddings between requests by the image's hash (its multimodal processor cache and
        ``v1/core/encoder_cache_manager.py``), so the vision tower runs once per image (vLLM's code; not measured
        here); the language model's prefill of the prompt repeats per completion, since vLLM skips prefix-cache
        reads for requests with prompt logprobs (``SamplingParams.skip_reading_prefix_cache``)."""
        usable()
        prompts, completions, top_k = check_score(body, limits)
        requests, owners = [], []
        try:
            for i, (payload, group) in enumerate(zip(prompts, completions, strict=True)):
                if "prompt" in payload:
                    base = list(tokenizer(payload["prompt"], add_special_tokens=True)["input_ids"])
                else:
                    base = list(payload["prompt_token_ids"])
                media = {k: v for k, v in payload.items() if k not in ("prompt", "prompt_token_ids")}
                for ids in group:
                    requests.append(decode_request({**media, "prompt_token_ids": base + list(ids)}, mm_kwargs,
                                                   present_video))
                    owners.append((i, len(ids)))
        except ValueError as exc:  # e.g. a video for a model whose videos go as images (from text only)
            raise BadRequest(400, str(exc)) from None
        params = [{"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": top_k, "detokenize": False}] * len(requests)
        try:
            outputs = batcher.submit(requests, params, None)
        except RequestRejected as exc:  # e.g. longer than max_model_len once its media are expanded
            raise BadRequest(400, str(exc)) from None
        except Exception as exc:
            state["broken"] = f"score failed: {type(exc).__name__}: {exc}"
            log.exception("engine failed during score; the server now reports itself broken")
            raise BadRequest(503, state["broken"]) from None
        replies: list[dict[str, Any]] = [{"prompt_token_ids": None, "completions": []} for _ in prompts]
        for (i, n), out in zip(owners, outputs, strict=True):
            ids = list(out.prompt_token_ids)
            steps = out.prompt_logprobs[len(ids) - n:]  # position j holds the logprob of token j given the ones before
            completion = {"logprobs": [float(step[t].logprob) for step, t in zip(steps, ids[len(ids) - n:], strict=True)]}
            if top_k:
                completion["top_logprobs"] = [[[int(t), float(lp.logprob)] for t, lp in sorted(
                    step.items(), key=lambda kv: kv[1].rank)[:top_k]] for step in steps]
            reply = replies[i]
            if reply["prompt_token_ids"] is None:
                reply["prompt_token_ids"] = ids[:len(ids) - n]
            elif reply["prompt_token_ids"] != ids[:len(ids) - n]:
                raise BadRequest(500, f"prompt {i}: vLLM expanded the prompt differently for two of its completions")
            reply["completions"].append(completion)
        state["score_requests"] += 1
        state["scored_tokens"] += sum(n for _, n in owners)
        return {"weights_version": state["weights_version"], "outputs": replies}

    @app.post("/open_weight_channel")
    def open_weight_channel(body: dict[str, Any]) -> dict[str, Any]:
        """Join the learner's broadcast group (blocks until every member has joined)."""
        usable()
        with lock:
            ranks = llm.collective_rpc("r1mm_open_channel", kwargs={
                "host": body["host"], "port": int(body["port"]), "world_size": int(body["world_size"]),
                "rank_offset": int(body["rank_offset"])})
        return {"ranks": ranks}

    def check_broadcast_specs(specs: list[Any]) -> None:
        usable()
        if expected:
            wrong = [n for n, shape, _ in specs if expected.get(n) not in (None, list(shape))]
            unknown = [n for n, _, _ in specs if n not in expected]
            if unknown or wrong:
                raise BadRequest(422, f"broadcast specs do not fit the model: unknown {unknown[:3]}, wrong shape {wrong[:3]}")

    @app.post("/prepare_weights_broadcast")
    def prepare_weights_broadcast(body: dict[str, Any]) -> dict[str, Any]:
        """The handshake before a broadcast: would this server take these tensors? The learner asks
        every server first and broadcasts only when all say yes: a refusal after the broadcast started
        would leave the learner blocked in an NCCL collective that has no timeout."""
        check_broadcast_specs(body["specs"])
        return {"ready": True}

    @app.post("/update_weights_broadcast")
    def update_weights_broadcast(body: dict[str, Any]) -> dict[str, Any]:
        """Receive the tensors named in ``specs`` over the broadcast group and load them in place."""
        specs = body["specs"]
        check_broadcast_specs(specs)
        with lock:
            try:
                checksums = llm.collective_rpc("r1mm_receive_weights", kwargs={
                    "specs": specs, "timeout_s": float(body.get("timeout_s", DEFAULT_TIMEOUT_S))})
                reset_caches(llm)
                state["weight_reloads"] += 1
            except Exception as exc:  # the group is half-way through a broadcast: no way back
                state["broken"] = f"broadcast weight update failed: {type(exc).__name__}: {exc}"
                raise BadRequest(503, state["broken"]) from None
            state["weights_version"] = int(body.get("version", state["weights_version"] + 1))
        return {"weights_version": state["weights_version"], "checksums": [float(c) for c in checksums]}

    @app.post("/update_weights")
    def update_weights(body: dict[str, Any]) -> dict[str, Any]:
        usable()
        if not isinstance(body.get("path"), str):
            raise BadRequest(400, "update_weights needs 'path', the folder of safetensors to load")
        folder = Path(body["path"])
        check_update(folder, expected)
        with lock:
            try:
                reload(folder)
            except Exception as exc:
                previous = state["last_good"]
                try:
                    if previous is None:
                        raise RuntimeError("no earlier weights to restore")
                    check_update(Path(previous), expected)  # still there, whole
                    reload(Path(previous))
                except Exception as restore_exc:
                    state["broken"] = (f"loading {folder} failed ({type(exc).__name__}: {exc}) and the previous weights "
                                       f"could not be restored ({restore_exc})")
                    raise BadRequest(503, state["broken"]) from None
                raise BadRequest(422, f"loading {folder} failed ({type(exc).__name__}: {exc}); the previous weights "
                                      f"(version {state['weights_version']}) were restored") from None
            state["last_good"] = folder
            state["weights_version"] = int(body.get("version", state["weights_version"] + 1))
        return {"weights_version": state["weights_version"]}

    @app.post("/load_adapter")
    def load_adapter(body: dict[str, Any]) -> dict[str, Any]:
        """The policy's LoRA adapter as version ``version`` (LoRA id and name ``policy-v<version>``): a new id each
        version, so vLLM never serves a cached older adapter. The previous version stays loaded (a learner rank that
        has not switched yet still gets the weights its request names), older ones are removed. A failed load
        changes nothing."""
        from vllm.lora.request import LoRARequest

        usable()
        if lora_config is None or adapter_root is None:
            raise BadRequest(409, "this server runs without --enable-lora: it cannot load an adapter")
        version, config, data = check_adapter(body, lora_config.max_lora_rank)
        folder = adapter_root / f"v{version}-{state['adapter_loads'] + 1}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(config))
        (folder / "adapter_model.safetensors").write_bytes(data)
        request = LoRARequest(f"policy-v{version}", version, str(folder))
        with lock:
            adapters: dict[str, Any] = state["adapters"]
            # the same version again (a retry): its old copy goes first, so vLLM does not keep the cached one
            replaced = adapters.pop(request.lora_name, None)
            if replaced is not None:
                llm.llm_engine.remove_lora(replaced.lora_int_id)
                shutil.rmtree(replaced.lora_path, ignore_errors=True)
            try:
                if not llm.llm_engine.add_lora(request):
                    raise RuntimeError("vLLM refused it")
            except Exception as exc:
                shutil.rmtree(folder, ignore_errors=True)
                raise BadRequest(422, f"loading adapter version {version} failed ({type(exc).__name__}: {exc}); "
                                      f"the server still holds {list(adapters) or 'no adapter'}") from None
            adapters[request.lora_name] = request
            while len(adapters) > 2:  # the current version and the one before it
                old = adapters.pop(next(iter(adapters)))
                llm.llm_engine.remove_lora(old.lora_int_id)
                shutil.rmtree(old.lora_path, ignore_errors=True)
            reset_caches(llm)  # cached prefixes and encoder outputs of the previous adapter
            state["adapter"] = request
            state["adapter_loads"] += 1
            state["loaded_ids"] = sorted(llm.llm_engine.list_loras())
        return {"adapter": request.lora_name, "adapter_version": version, "bytes": len(data)}

    return SizeLimit(app, max_request_bytes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="r1-mm serve rollout", description="A vLLM rollout server for the vllm_pool engine.")
    p.add_argument("--model", required=True, help="path, hub id or tiny:... name (the policy's starting weights)")
    p.add_argument("--host", default="127.0.0.1", help=f"loopback unless you need otherwise (then set {API_KEY_ENV})")
    p.add_argument("--port", type=int, default=8100, help="port to listen on (default 8100)")
    p.add_argument("--dtype", default="auto", help="vLLM's dtype (the recipe's rollout.vllm_dtype; default auto)")
    p.add_argument("--max-model-len", type=int, default=8192, help="most tokens per sequence (default 8192)")
    p.add_argument("--max-images", type=int, default=8, help="most images in one prompt (default 8)")
    p.add_argument("--max-videos", type=int, default=1, help="most videos in one prompt (default 1)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per model; only 1 is supported yet")
    p.add_argument("--data-parallel-size", type=int, default=1, help="model replicas; only 1 is supported yet")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="GPU only: the share of the GPU's memory vLLM takes (default 0.9)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="vLLM's token budget per step (default: vLLM's)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="vLLM's sequences per step (default: vLLM's)")
    p.add_argument("--executor", choices=["auto", "mp"], default="auto",
                   help="vLLM's executor: auto (vLLM's choice: in-process with one GPU) or mp (worker processes, "
                        "arguments pickled, as with tensor parallel > 1)")
    p.add_argument("--seed", type=int, default=0, help="vLLM's engine seed (default 0)")
    p.add_argument("--max-request-mb", type=float, default=1024.0, help="larger request bodies get HTTP 413")
    p.add_argument("--no-batching", action="store_true",
                   help="run concurrent generate requests one after the other (CPU: sampling then does not "
                        "depend on which requests arrive together)")
    p.add_argument("--enable-lora", action="store_true",
                   help="serve the policy's LoRA adapter over the base weights (vllm_pool with "
                        "rollout.weight_sync_lora=adapter): POST /load_adapter, generate requests name it")
    p.add_argument("--max-lora-rank", type=int, default=16, help="with --enable-lora: the largest adapter rank (vLLM's "
                   "slots: 1, 8, 16, 32, 64, 128, 256, 320, 512; default 16)")
    p.add_argument("--lora-vision", action="store_true",
                   help="with --enable-lora: adapters on the vision tower and connector too (vLLM's experimental "
                        "enable_tower_connector_lora, Qwen-VL families; /health says whether the model serves them)")
    p.add_argument("--api-key-env", default=API_KEY_ENV,
                   help="environment variable holding the API key clients must send (unset: no key)")
    args = p.parse_args(argv)
    if args.tensor_parallel_size > 1 or args.data_parallel_size > 1:  # why: preflight.engine_parallelism_problems
        p.error("--tensor-parallel-size and --data-parallel-size above 1 are not supported yet (no test has run a "
                "server with several workers; vLLM's LLM class raises for data parallel): start one server per GPU")

    import torch
    import uvicorn

    from r1_mm.config.recipe import ModelConfig
    from r1_mm.models.loading import load_processor, resolve_model_path
    from r1_mm.rollout.vllm_common import engine_sizing, normalisation_kwargs, set_cpu_defaults

    set_cpu_defaults()
    from vllm import LLM

    path = resolve_model_path(ModelConfig(name_or_path=args.model))
    model_dir = Path(path) if Path(path).is_dir() else _cached_snapshot(path)
    kwargs: dict[str, Any] = dict(model=path, dtype=args.dtype,
                                  max_model_len=args.max_model_len, seed=args.seed,
                                  limit_mm_per_prompt={"image": args.max_images, "video": args.max_videos},
                                  logprobs_mode="processed_logprobs", tensor_parallel_size=args.tensor_parallel_size,
                                  data_parallel_size=args.data_parallel_size,
                                  worker_extension_cls="r1_mm.rollout.weight_channel.WeightReceiverExtension")
    kwargs.update(engine_sizing(args.max_num_batched_tokens, args.max_num_seqs))
    processor = load_processor(ModelConfig(name_or_path=args.model))
    kwargs.update(normalisation_kwargs(processor))
    if args.executor == "mp":
        kwargs["distributed_executor_backend"] = "mp"
    if args.enable_lora:
        # two adapters in vLLM's cache (the current version and the previous one, see /load_adapter) plus the one
        # being added; one per engine step (a batch mixing versions runs them in turn)
        kwargs.update(enable_lora=True, max_lora_rank=args.max_lora_rank, max_loras=1, max_cpu_loras=3,
                      enable_tower_connector_lora=args.lora_vision)
    elif args.lora_vision:
        p.error("--lora-vision needs --enable-lora")
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        kwargs["enforce_eager"] = True
    llm = LLM(**kwargs)
    api_key = os.environ.get(args.api_key_env) or None
    app = build_app(llm, args.model, model_dir=model_dir, api_key=api_key,
                    max_request_bytes=int(args.max_request_mb * 2**20), batching=not args.no_batching,
                    processor=processor)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a hub model (for the update checks), if the hub cache holds one."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        log.warning("no local snapshot of %s: weight updates are checked for path and files only", repo_id)
        return None
