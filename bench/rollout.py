"""Rollout throughput: completion tokens per second at G = 8 for the hf, vllm_colocate and vllm_pool
engines on the same prompts (image and video), plus the time one weight sync takes.

Each engine runs in its own process (one vLLM per process; the pool engine starts its own server).
The model is the benchmark tiny Qwen2.5-VL of bench/grpo_step.py (random weights, so completion
lengths vary; the rate divides by the tokens actually generated). Usage:

    .venv/bin/python bench/rollout.py                 # prints a markdown table
    .venv/bin/python bench/rollout.py --repeats 3 --max-tokens 64
    .venv/bin/python bench/rollout.py --ranks 2       # N learner ranks against ONE rollout server,
                                                      # batched together (default) or one at a time
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
G = 8
ENGINES = ("hf", "vllm_colocate", "vllm_pool")


def make_samples(case: str, processor, tmp: Path, prompts: int) -> list:
    from PIL import Image

    from r1_mm.config.recipe import DataConfig, MediaConfig
    from r1_mm.data import PromptBuilder
    from r1_mm.testing.synthetic import event_video, write_mp4

    rows = []
    for i in range(prompts):
        if case == "image":
            img = Image.new("RGB", (448, 448))
            img.paste((200, 30 + 40 * i, 30), (50 + 20 * i, 60, 250, 260))
            img.save(tmp / f"img{i}.png")
            rows.append({"image": f"img{i}.png", "prompt": "How many squares are in the image?"})
        else:
            write_mp4(event_video(4.0, 4, 1.0 + 0.2 * i, 2.5, colour="red", size=224), tmp / f"vid{i}.mp4", 4)
            rows.append({"video": f"vid{i}.mp4", "prompt": "When does the square appear?"})
    media = MediaConfig(max_pixels=448 * 448, min_pixels=448 * 448, video_max_pixels=224 * 224,
                        video_min_pixels=224 * 224, video_total_pixels=224 * 224 * 8, max_frames=8, min_frames=8)
    builder = PromptBuilder(processor, DataConfig(max_prompt_length=4096, format_instruction=None), media, tmp)
    return [builder.prepare(r, i) for i, r in enumerate(rows)]


def worker(engine_name: str, case: str, repeats: int, max_tokens: int, prompts: int) -> dict:
    import torch
    from grpo_step import bench_model_path

    from r1_mm.config.recipe import load_recipe
    from r1_mm.models.loading import load_model, load_processor
    from r1_mm.rollout import SamplingSettings, make_engine

    tmp = Path(tempfile.mkdtemp())
    cfg = load_recipe(None, [f"model.name_or_path={bench_model_path()}", "rollout.vllm_dtype=float32",
                             "rollout.vllm_max_model_len=4096", "rollout.pool_size=1", f"training.output_dir={tmp}/run"])
    processor, model = load_processor(cfg.model), load_model(cfg.model)
    samples = make_samples(case, processor, tmp, prompts)
    engine = make_engine(engine_name, model=model, processor=processor, cfg=cfg)
    sampling = SamplingSettings(max_tokens=max_tokens, temperature=1.0, seed=0)
    engine.generate(samples[:1], 2, sampling)  # warm-up (compilation, caches)
    rates, syncs = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        out = engine.generate(samples, G, SamplingSettings(max_tokens=max_tokens, temperature=1.0, seed=r))
        seconds = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for o in out for c in o.completions)
        rates.append(tokens / seconds)
        if engine_name != "hf":
            with torch.no_grad():
                next(model.parameters()).add_(1e-3)
            t0 = time.perf_counter()
            engine.update_weights(model)
            syncs.append(time.perf_counter() - t0)
    engine.close()
    return {"tokens_per_s": statistics.median(rates), "sync_s": statistics.median(syncs) if syncs else None}


def send_at_once(url: str, bodies: list[dict]) -> tuple[list[dict], float]:
    """Every body posted by its own client thread, released together; (replies, wall seconds)."""
    import threading

    import httpx

    replies: list = [None] * len(bodies)
    go = threading.Barrier(len(bodies))

    def send(k: int) -> None:
        with httpx.Client(timeout=1200) as client:
            go.wait()
            replies[k] = client.post(f"{url}/generate", json=bodies[k]).json()

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(bodies))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies, time.perf_counter() - t0


def ranks_against_one_server(ranks: int, repeats: int, max_tokens: int, prompts: int) -> dict[str, dict]:
    """Each rank (a thread with its own HTTP client, as a learner process would have) sends its
    prompts x G at the same moment to one `r1-mm serve rollout`; the server once with requests joining
    the engine's running batch (the default), once with them run one after the other (--no-batching)."""
    import httpx
    from grpo_step import bench_model_path

    from r1_mm.config.recipe import ModelConfig
    from r1_mm.models.loading import load_processor
    from r1_mm.rollout import SamplingSettings
    from r1_mm.rollout.servers import free_port
    from r1_mm.rollout.transport import encode_sample
    from r1_mm.rollout.vllm_common import sampling_kwargs

    tmp = Path(tempfile.mkdtemp())
    model = bench_model_path()
    processor = load_processor(ModelConfig(name_or_path=str(model)))
    samples = make_samples("image", processor, tmp, prompts * ranks)
    out: dict[str, dict] = {}
    for mode in ("one_at_a_time", "batched"):
        port = free_port()
        cmd = [sys.executable, "-m", "r1_mm.cli", "serve", "rollout", "--model", str(model), "--port", str(port),
               "--dtype", "float32", "--max-model-len", "4096"]
        cmd += ["--no-batching"] if mode == "one_at_a_time" else []
        server = subprocess.Popen(cmd, stdout=(tmp / f"{mode}.log").open("w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(1)
            rates = []
            for r in range(repeats + 1):  # the first round warms the engine up
                bodies = []
                for k in range(ranks):
                    mine = samples[k * prompts:(k + 1) * prompts]
                    settings = SamplingSettings(max_tokens=max_tokens, temperature=1.0, seed=r * 100 + k)
                    bodies.append({"prompts": [encode_sample(s) for s in mine],
                                   "sampling": [sampling_kwargs(settings, G, [], i) for i in range(len(mine))]})
                replies, seconds = send_at_once(url, bodies)
                tokens = sum(len(c["token_ids"]) for rep in replies for o in rep["outputs"] for c in o["completions"])
                if r > 0:
                    rates.append(tokens / seconds)
            health = httpx.get(f"{url}/health").json()
            out[mode] = {"tokens_per_s": statistics.median(rates), "batches": health["batches"]}
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--ranks", type=int, help="clients sending to one server at once (instead of the engine table)")
    p.add_argument("--worker", nargs=2, metavar=("ENGINE", "CASE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ranks:
        res = ranks_against_one_server(args.ranks, args.repeats, args.max_tokens, args.prompts)
        print(f"\n{args.ranks} ranks x {args.prompts} image prompts x G={G} each, at once, against one server; up to "
              f"{args.max_tokens} tokens, median of {args.repeats}\n")
        print("| server | completion tok/s | vs one at a time | engine runs / requests | most requests in flight |")
        print("|---|---|---|---|---|")
        base = res["one_at_a_time"]["tokens_per_s"]
        for mode in ("one_at_a_time", "batched"):
            b = res[mode]["batches"]
            print(f"| {mode.replace('_', ' ')} | {res[mode]['tokens_per_s']:.0f} | {res[mode]['tokens_per_s'] / base:.2f}x "
                  f"| {b['engine_runs']} / {b['requests']} | {b['most_requests_in_flight']} |")
        return
    if args.worker:
        print(json.dumps(worker(*args.worker, args.repeats, args.max_tokens, args.prompts)))
        return
    results = {}
    for case in ("image", "video"):
        for engine in ENGINES:
            run = subprocess.run([sys.executable, __file__, "--worker", engine, case, "--repeats", str(args.repeats),
                                  "--max-tokens", str(args.max_tokens), "--prompts", str(args.prompts)],
                                 capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if run.returncode != 0:
                sys.exit(f"{engine}/{case} failed:\n{run.stderr[-3000:]}")
            results[(case, engine)] = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{case:<6} {engine:<14} {results[(case, engine)]}", file=sys.stderr)
    print(f"\n{args.prompts} prompts x G={G}, up to {args.max_tokens} tokens, median of {args.repeats}\n")
    print("| prompts | engine | completion tok/s | vs hf | weight sync |")
    print("|---|---|---|---|---|")
    for case in ("image", "video"):
        base = results[(case, "hf")]["tokens_per_s"]
        for engine in ENGINES:
            r = results[(case, engine)]
            sync = f"{r['sync_s'] * 1000:.0f} ms" if r["sync_s"] is not None else "none (same weights)"
            print(f"| {case} | {engine} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | {sync} |")


if __name__ == "__main__":
    main()
