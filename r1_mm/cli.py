"""The ``r1-mm`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _cmd_train(argv: list[str]) -> int:
    from r1_mm.jobs.train import main

    return main(argv, prog="r1-mm train")


def _cmd_launch(argv: list[str]) -> int:
    from r1_mm.jobs.launch import main

    return main(argv)


def _exit_2_on_bad_input(job: Callable[[], Any]) -> tuple[Any, int]:
    """(job's result, 0), or (None, 2) after one line on stderr when the job finds a bad recipe, machine
    or row (ConfigError, DataError: raised at load, before any model loads)."""
    from r1_mm.config.recipe import ConfigError
    from r1_mm.data.loading import DataError

    try:
        return job(), 0
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None, 2


def _cmd_rollout(argv: list[str]) -> int:
    from r1_mm.jobs.rollout import run_rollouts
    from r1_mm.jobs.train import resolve

    def job() -> Path:
        cfg, _ = resolve(argv, prog="r1-mm rollout", description=(
            "Sample completions for a recipe's data without training (no rewards, no updates)."))
        return run_rollouts(cfg)

    run_dir, code = _exit_2_on_bad_input(job)
    if code:
        return code
    print(f"rollouts written to {run_dir}/completions.jsonl, metrics to {run_dir}/metrics.jsonl")
    return 0


def _cmd_plan(argv: list[str]) -> int:
    from r1_mm.jobs.plan import main

    return main(argv)


def make_demo_data(out: Path, rows: int, seed: int) -> Path:
    from r1_mm.testing.synthetic import make_counting_task

    # 56x56 images: 1-4 squares, each on one of the 2x2 visual tokens (28-px cells)
    return make_counting_task(out, rows, seed=seed, min_count=1, max_count=4, size=56, box=20, gap=8)


def make_zoom_demo_data(out: Path, rows: int, seed: int) -> tuple[Path, Path]:
    """The zoom-in demo's rows and its SFT rows. 224x224 images whose 1-4 squares all sit in the 56x56 corner the
    question names; shown at 56x56 (media.max_pixels) the corner is a quarter of one visual token, while
    crop_image on it returns the counting demo's image (each square on one of its 2x2 tokens)."""
    from r1_mm.data.loading import read_rows
    from r1_mm.testing.synthetic import make_zoom_crop_task, make_zoom_sft_task, make_zoom_task, write_jsonl

    zoom = make_zoom_task(out, rows, seed=seed, size=224, region=56, min_count=1, max_count=4, box=20, gap=8)
    # half the zoom rows call crop_image on the right corner, half answer at once: GRPO has a call rate to raise;
    # beside them, counting on the crops themselves: what the tool shows must be readable for a call to pay
    calls = make_zoom_sft_task(zoom, rows, shown=56, seed=seed + 1, call_fraction=0.5, answers="solution")
    crops = make_zoom_crop_task(zoom, rows)
    sft = write_jsonl(read_rows(calls) + read_rows(crops), zoom.parent / "zoom_sft_mix.jsonl")
    return zoom, sft


def _demo_zoom(out: Path, rows: int, sft_steps: int | None, overrides: list[str]) -> int:
    """SFT (the call format) -> GRPO with crop_image, and the same GRPO without tools, then both curves."""
    zoom, sft = make_zoom_demo_data(out / "data", rows, seed=0)
    print(f"demo: synthetic zoom-in data in {zoom} (SFT rows: {sft})")
    sft_args = [str(REPO_RECIPES / "demo_zoom_sft.yaml"), f"data.train_path={sft}", f"training.output_dir={out / 'sft'}",
                "training.overwrite_output_dir=true"] + ([f"training.max_steps={sft_steps}"] if sft_steps else [])
    code = _cmd_train(sft_args)
    if code:
        return code
    runs = {"GRPO with crop_image": out / "tools", "GRPO without tools": out / "no_tools"}
    for label, folder in runs.items():
        print(f"demo: {label}")
        extra = ["tools.functions=[]"] if folder.name == "no_tools" else []
        code = _cmd_train([str(REPO_RECIPES / "demo_zoom_grpo.yaml"), f"data.train_path={zoom}",
                           f"model.name_or_path={out / 'sft'}", f"training.output_dir={folder}",
                           "training.overwrite_output_dir=true", *extra, *overrides])
        if code:
            return code
    from r1_mm.run.plotting import plot_comparison

    print(f"demo: curves in {plot_comparison(runs, out / 'comparison.png', ['rewards/accuracy/mean', 'tools/call_rate'])}")
    return 0


def _cmd_demo(argv: list[str]) -> int:
    from r1_mm.config.doc import OVERRIDES_EPILOG

    p = argparse.ArgumentParser(prog="r1-mm demo", description=(
        "Build the tiny offline model and synthetic data, then run a demo: counting (GRPO alone teaches a random "
        "tiny model to count) or zoom (a short SFT teaches the crop_image call, then GRPO with the tool against "
        "GRPO without it)."),
        epilog=OVERRIDES_EPILOG)
    p.add_argument("--task", choices=("counting", "zoom"), default="counting", help="which demo (default counting)")
    p.add_argument("--out", default=None, help="run folder (data, metrics, checkpoints; default runs/demo, runs/demo_zoom)")
    p.add_argument("--recipe", default=str(REPO_RECIPES / "demo_counting_grpo.yaml"),
                   help="counting: the recipe to run (default: recipes/demo_counting_grpo.yaml); one whose file name has "
                        "\"rollout\" only samples")
    p.add_argument("--rows", type=int, default=None, help="synthetic rows to generate (default 512; zoom 1024)")
    p.add_argument("--sft-steps", type=int, default=None,
                   help="SFT steps: zoom, its SFT stage's (default: the SFT recipe's); counting, an SFT cold start "
                        "(recipes/demo_counting_sft.yaml) before GRPO, in OUT/sft and OUT/grpo (default: none)")
    p.add_argument("overrides", nargs="*", help="section.field=value recipe overrides (zoom: of the GRPO runs)")
    args = p.parse_intermixed_args(argv)  # overrides before or after the options
    if args.task == "zoom":
        return _demo_zoom(Path(args.out or "runs/demo_zoom"), args.rows or 1024, args.sft_steps, args.overrides)
    out = Path(args.out or "runs/demo")
    data = make_demo_data(out / "data", args.rows or 512, seed=0)
    print(f"demo: synthetic data in {data}")
    # the demo is meant to be run again: each run replaces the previous one's files (the data stay)
    overrides = [f"data.train_path={data}", f"training.output_dir={out}", "training.overwrite_output_dir=true",
                 *args.overrides]
    if args.sft_steps:  # an SFT cold start on the same rows (their counts as responses), then GRPO from it
        from r1_mm.data.loading import read_rows
        from r1_mm.testing.synthetic import write_jsonl

        sft_rows = write_jsonl([{**r, "response": r["solution"]} for r in read_rows(data)], data.parent / "sft.jsonl")
        code = _cmd_train([str(REPO_RECIPES / "demo_counting_sft.yaml"), f"data.train_path={sft_rows}",
                           f"training.output_dir={out / 'sft'}", "training.overwrite_output_dir=true",
                           f"training.max_steps={args.sft_steps}"])
        if code:
            return code
        out = out / "grpo"
        overrides = [f"data.train_path={data}", f"training.output_dir={out}", "training.overwrite_output_dir=true",
                     f"model.name_or_path={out.parent / 'sft'}", *args.overrides]
    if "rollout" in Path(args.recipe).stem:
        return _cmd_rollout([args.recipe, *overrides])
    code = _cmd_train([args.recipe, *overrides])
    if code == 0:
        from r1_mm.run.plotting import plot_run

        print(f"demo: curves in {plot_run(out)}")
    return code


class _WholeNamesFormatter(argparse.HelpFormatter):
    """Wraps the description at spaces only, so that a family name (LLaVA-OneVision, Qwen3-VL-MoE) is never
    split at its hyphen across two lines."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


def _cmd_make_tiny(argv: list[str]) -> int:
    from r1_mm.models.tiny import FAMILIES, FAMILY_NAMES, TinySpec, build_tiny_model

    p = argparse.ArgumentParser(prog="r1-mm make-tiny", description="Build a tiny random-weight VLM offline: "
                                + ", ".join(f"{name} ({family})" for family, name in FAMILY_NAMES.items()) + ".",
                                formatter_class=_WholeNamesFormatter)
    p.add_argument("family", choices=FAMILIES, help="the model family to build")
    p.add_argument("out", help="folder to write the model and processor to (loads with from_pretrained)")
    p.add_argument("--small-vocab", action="store_true",
                   help="a 96-token vocabulary in which digits and <think>/<answer> tags are single tokens")
    p.add_argument("--tools", action="store_true",
                   help="a tokenizer that writes tool calls in a few tokens (Hermes tags as single tokens; the zoom demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = p.parse_args(argv)
    path = build_tiny_model(args.out, TinySpec(family=args.family, small_vocab=args.small_vocab, seed=args.seed,
                                               tools=args.tools))
    print(path)
    return 0


def _cmd_check_model(argv: list[str]) -> int:
    from r1_mm.jobs.check_model import ENGINES, FLOAT32_TOLERANCE, HALF_TOLERANCE, check_model

    p = argparse.ArgumentParser(prog="r1-mm check-model", description=(
        "Check a model's sampler/learner contract on synthetic rows (one image, two images, a short video) and "
        "print a table: processor placeholders vs vision features, grouped vs naive logprobs, learner vs sampler "
        "logprobs after a weight sync, weight names the engine accepts. Exit 0 when all pass, 1 on any mismatch, "
        "2 for a model that cannot be read."))
    p.add_argument("model", help="a local model folder, a hub id (cached, when offline) or tiny:FAMILY[:small]")
    p.add_argument("--engine", choices=ENGINES, default="hf", help="the rollout engine to sample with and sync to "
                   "(default hf; vllm_colocate also checks the weight names its loader accepts); learner vs sampler "
                   f"tolerance: {FLOAT32_TOLERANCE:g} for a float32 model, {HALF_TOLERANCE:g} for bf16/fp16")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic rows, completions and perturbation (default 0)")
    args = p.parse_args(argv)
    report, code = _exit_2_on_bad_input(lambda: check_model(args.model, engine=args.engine, seed=args.seed))
    if code:
        return code
    print(report.table())
    return report.code


def _cmd_make_data(argv: list[str]) -> int:
    from r1_mm.testing import synthetic

    tasks = {"counting": synthetic.make_counting_task, "spatial": synthetic.make_spatial_task,
             "events": synthetic.make_event_video_task, "multi_image": synthetic.make_multi_image_task}
    p = argparse.ArgumentParser(prog="r1-mm make-data", description="Write a synthetic task (media + jsonl).")
    p.add_argument("task", choices=sorted(tasks), help="which synthetic task to write")
    p.add_argument("out", help="folder for the media files and the task's jsonl")
    p.add_argument("--rows", type=int, default=32, help="rows to generate (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated rows (default 0)")
    args = p.parse_args(argv)
    print(tasks[args.task](args.out, args.rows, seed=args.seed))
    return 0


def _cmd_plot(argv: list[str]) -> int:
    from r1_mm.run.plotting import plot_run

    p = argparse.ArgumentParser(prog="r1-mm plot", description="Draw a run's metrics.jsonl to a PNG.")
    p.add_argument("run_dir", help="a run folder (holds metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p.add_argument("--smooth", type=int, default=20,
                   help="moving-average window in logged steps (at most a tenth of the run)")
    p.add_argument("--metrics", help="comma-separated panels: metric names, globs (rewards/by_type/*/total) "
                                     "or 'rewards' (every reward's mean); default: rewards, KL, length, entropy")
    args = p.parse_args(argv)
    panels = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        print(plot_run(args.run_dir, args.out, smooth=args.smooth, panels=panels))
    except (ValueError, OSError) as exc:  # an unknown metric, no or an empty metrics.jsonl: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_compare(argv: list[str]) -> int:
    from r1_mm.run.compare import reached, table
    from r1_mm.run.plotting import plot_comparison

    p = argparse.ArgumentParser(prog="r1-mm compare", description=(
        "When did each run reach a target: the first step at which the trailing mean of a metric reaches a "
        "threshold, and the training seconds up to it (a markdown table; the first run is the reference)."))
    p.add_argument("runs", nargs="+", help="run folders, each optionally LABEL=RUN_DIR (split at the last =)")
    p.add_argument("--metric", default="rewards/accuracy/mean", help="the metric (default rewards/accuracy/mean)")
    p.add_argument("--threshold", type=float, default=0.8, help="the target value of the trailing mean (default 0.8)")
    p.add_argument("--window", type=int, default=20, help="steps in the trailing mean (default 20)")
    p.add_argument("--out", help="also draw the runs' curves of the metric side by side to this PNG")
    args = p.parse_args(argv)
    runs = dict(r.rsplit("=", 1) if "=" in r else (r, r) for r in args.runs)  # a label may hold "=" (K=1)
    try:
        results = [reached(label, folder, args.metric, args.threshold, args.window) for label, folder in runs.items()]
        print(table(results, args.metric, args.threshold, args.window))
        if args.out:
            print(f"curves: {plot_comparison(runs, args.out, [args.metric], smooth=args.window)}")
    except (ValueError, OSError) as exc:  # no metrics.jsonl, no rows, a metric the run never logs
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _json_object(text: str, flag: str) -> dict[str, Any]:
    """A command-line option that holds a JSON object; a ConfigError naming the option otherwise."""
    import json

    from r1_mm.config.recipe import ConfigError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} is not valid JSON ({exc.msg} at character {exc.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object ({{...}}), got {text!r}")
    return value


def _print_report(report: Any) -> int:
    """A check's lines, its problems on stderr and the verdict; exit 1 on any problem."""
    print("\n".join(report.lines))
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    print("ok" if report.ok else f"{len(report.problems)} problem(s)")
    return 0 if report.ok else 1


def _cmd_rewards(argv: list[str]) -> int:
    from r1_mm.jobs.rewards_check import check_reward
    from r1_mm.rewards.registry import available

    p = argparse.ArgumentParser(prog="r1-mm rewards", description="List rewards or check one on sample rows.")
    sub = p.add_subparsers(dest="action", required=True, help="list or check (`r1-mm rewards check --help`)")
    sub.add_parser("list", help="every registered reward and where it comes from")
    check = sub.add_parser("check", help="run a reward on sample rows and report problems in plain words")
    check.add_argument("spec", help="name, pkg.module:fn or path/to/file.py:fn")
    check.add_argument("--data", required=True, help="a jsonl/json/csv data file")
    check.add_argument("--rows", type=int, default=4, help="rows of the data file to score (default 4)")
    check.add_argument("--kwargs", default="{}", help='JSON object of the reward\'s recipe kwargs, e.g. \'{"tag": "ans"}\'')
    check.add_argument("--columns", default="{}", help='JSON object: the recipe\'s data.columns (source column -> '
                       'r1-mm column), e.g. \'{"ground_truth": "solution"}\'')
    args = p.parse_args(argv)
    if args.action == "list":
        for name, source in available().items():
            print(f"{name:<18} {source}")
        return 0
    report, code = _exit_2_on_bad_input(lambda: check_reward(
        args.spec, args.data, rows=args.rows, kwargs=_json_object(args.kwargs, "--kwargs"),
        columns=_json_object(args.columns, "--columns")))
    if code:
        return code
    return _print_report(report)


def _cmd_tools(argv: list[str]) -> int:
    from r1_mm.jobs.tools_check import check_tool
    from r1_mm.tools.registry import available

    p = argparse.ArgumentParser(prog="r1-mm tools", description="List tools or call one on a row of your data.")
    sub = p.add_subparsers(dest="action", required=True, help="list or check (`r1-mm tools check --help`)")
    sub.add_parser("list", help="every registered tool and where it comes from")
    check = sub.add_parser("check", help="call a tool on a row and show what the model would get back")
    check.add_argument("spec", help="name, pkg.module:fn or path/to/file.py:fn")
    check.add_argument("--data", required=True, help="a jsonl/json/csv data file")
    check.add_argument("--row", type=int, default=0, help="the row (0-based position in the file; default 0)")
    check.add_argument("--args", required=True, help='JSON object of the call\'s arguments, as the model writes '
                       'them, e.g. \'{"bbox_2d": [10, 10, 60, 60]}\'')
    check.add_argument("--kwargs", default="{}", help="JSON object of the tool's recipe kwargs, e.g. "
                       '\'{"coordinates": "thousandths"}\'')
    check.add_argument("--columns", default="{}", help="JSON object: the recipe's data.columns")
    check.add_argument("--out", type=Path, help="write the returned images here as PNG files")
    args = p.parse_args(argv)
    if args.action == "list":
        for name, source in available().items():
            print(f"{name:<18} {source}")
        return 0
    report, code = _exit_2_on_bad_input(lambda: check_tool(
        args.spec, args.data, arguments=_json_object(args.args, "--args"), row=args.row,
        kwargs=_json_object(args.kwargs, "--kwargs"), columns=_json_object(args.columns, "--columns"), out=args.out))
    if code:
        return code
    return _print_report(report)


def _cmd_serve(argv: list[str]) -> int:
    if argv[:1] == ["rollout"]:
        from r1_mm.rollout.server import main as serve_rollout

        return serve_rollout(argv[1:])
    from r1_mm.config.recipe import ModelConfig
    from r1_mm.models.loading import resolve_model_path
    from r1_mm.rollout.servers import ServerSpec

    p = argparse.ArgumentParser(prog="r1-mm serve", description=(
        "`serve critic`: vLLM's OpenAI-compatible server for a judge model (the critic reward). "
        "`serve rollout --help`: a rollout server for the vllm_pool engine."))
    p.add_argument("role", choices=["critic", "rollout"], help="critic: this server; rollout: see `r1-mm serve rollout --help`")
    p.add_argument("--model", required=True, help="path, hub id or tiny:... name of the judge")
    p.add_argument("--host", default="127.0.0.1", help="loopback by default: the server has no auth unless --api-key")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: the model path)")
    p.add_argument("--max-model-len", type=int, default=4096, help="most tokens per request (default 4096)")
    p.add_argument("--max-images", type=int, default=16, help="images (or video frames) per request")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="CPU only: KV-cache memory in GiB")
    p.add_argument("--api-key", default=None, help="key clients must send (default: none, so keep --host on loopback)")
    p.add_argument("--dry-run", action="store_true", help="print the server command and exit")
    args, extra = p.parse_known_args(argv)
    spec = ServerSpec(model=resolve_model_path(ModelConfig(name_or_path=args.model)), host=args.host,
                      port=args.port, served_model_name=args.served_model_name, max_model_len=args.max_model_len,
                      max_images_per_prompt=args.max_images, kv_cache_gib=args.kv_cache_gib, api_key=args.api_key,
                      extra_args=extra)
    print(" ".join(spec.command()), flush=True)
    if args.dry_run:
        return 0
    print(f"critic server: {spec.base_url} (set the critic reward's base_url to this)", flush=True)
    import os

    command = spec.command()
    os.execve(command[0], command, spec.environment())  # become the server: signals reach vLLM itself
    return 0  # not reached


def _cmd_sweep(argv: list[str]) -> int:
    from r1_mm.config.doc import OVERRIDES_EPILOG
    from r1_mm.jobs.sweep import run_sweep

    p = argparse.ArgumentParser(prog="r1-mm sweep", description=(
        "Run (or --print the launch commands of) every grid combination x seed, each its own W&B-grouped run."),
        epilog=OVERRIDES_EPILOG)
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--grid", action="append", default=[], help="section.field=v1,v2: the values one field takes across the sweep (repeatable)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--group", default=None, help="W&B group and sweep folder name (default: the recipe's name)")
    p.add_argument("--out", default=None, help="sweep folder (default runs/sweeps/GROUP)")
    p.add_argument("--launcher", default=f"{sys.executable} -m r1_mm.train",
                   help="command that takes RECIPE OVERRIDES..., e.g. 'accelerate launch --config_file X -m r1_mm.train'")
    p.add_argument("--print", action="store_true", dest="print_only", help="print the commands, run nothing")
    args, extra = p.parse_known_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        return run_sweep(args.recipe, args.grid, seeds, out_root=args.out, group=args.group, launcher=args.launcher,
                         extra=extra, print_only=args.print_only)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _recipe_and_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, Any]:
    """Parse a command whose arguments are RECIPE, options and key=value overrides in any order;
    the recipe is None (the error printed) when it does not load."""
    from r1_mm.config.recipe import ConfigError, load_recipe

    args, extra = parser.parse_known_args(argv)  # overrides after options land in `extra`
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args, load_recipe(args.recipe, args.overrides + extra)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return args, None


def _cmd_eval(argv: list[str]) -> int:
    import json

    from r1_mm.config.doc import OVERRIDES_EPILOG
    from r1_mm.jobs.evaluate import evaluate_checkpoint

    if any(a == "--lmms-eval" or a.startswith("--lmms-eval=") for a in argv):
        return _cmd_lmms_eval(argv)
    p = argparse.ArgumentParser(prog="r1-mm eval", description=(
        "Score a checkpoint on the recipe's data.eval_path with its rewards (greedy, or training.eval_samples); "
        "with --lmms-eval TASKS, on lmms-eval's benchmarks instead (see r1-mm eval --lmms-eval x --help)."),
        epilog=OVERRIDES_EPILOG)
    p.add_argument("recipe", help="recipe YAML file (the run's recipe.resolved.yaml works)")
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoints/step-N (or any transformers model folder)")
    p.add_argument("overrides", nargs="*", help="section.field=value recipe overrides, e.g. training.eval_samples=4")
    # listed here so that --help shows it; a command line that has it runs _cmd_lmms_eval instead
    p.add_argument("--lmms-eval", metavar="TASKS", help="score the checkpoint on lmms-eval's benchmarks instead "
                   "(no recipe; see r1-mm eval --lmms-eval x --help)")
    args, cfg = _recipe_and_overrides(p, argv)
    if cfg is None:
        return 2
    metrics, code = _exit_2_on_bad_input(lambda: evaluate_checkpoint(cfg, args.checkpoint))
    if code:
        return code
    print(json.dumps(metrics, indent=1))
    return 0


def _cmd_lmms_eval(argv: list[str]) -> int:
    import json

    from r1_mm.config.recipe import ConfigError
    from r1_mm.jobs.lmms_eval import LmmsEvalRun, model_folder, run_lmms_eval

    p = argparse.ArgumentParser(prog="r1-mm eval --lmms-eval", description=(
        "A checkpoint's model/ scored by lmms-eval (installed in .venv-eval by scripts/setup_eval.sh). "
        "Arguments after -- go to lmms-eval as they are."))
    p.add_argument("--lmms-eval", dest="tasks", required=True, help="lmms-eval task names, comma-separated")
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoints/step-N, or a transformers model folder")
    p.add_argument("--include-path", help="a folder of your own lmms-eval task definitions (YAML + utils.py)")
    p.add_argument("--limit", type=float, help="documents per task (a fraction below 1)")
    p.add_argument("--lmms-model", help="lmms-eval's model name (default: from config.json's model_type)")
    p.add_argument("--batch-size", type=int, default=1, help="lmms-eval's batch size (default 1)")
    p.add_argument("--output", help="results folder (default: CHECKPOINT/lmms_eval)")
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = p.parse_args(own)
    try:
        folder = model_folder(args.checkpoint)
        run = LmmsEvalRun(model_dir=folder.resolve(), tasks=args.tasks,
                          output_dir=Path(args.output or Path(args.checkpoint) / "lmms_eval").resolve(),
                          include_path=args.include_path, limit=args.limit, lmms_model=args.lmms_model,
                          batch_size=args.batch_size, extra=tuple(extra))
        summary = run_lmms_eval(run)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("results", "n_samples", "results_file")}, indent=1))
    return 0


def _cmd_dpo(argv: list[str]) -> int:
    from r1_mm.config.doc import OVERRIDES_EPILOG
    from r1_mm.jobs.dpo_reference import precompute_reference

    p = argparse.ArgumentParser(prog="r1-mm dpo", description="Preference-data tools.")
    sub = p.add_subparsers(dest="action", required=True, help="the tool (`r1-mm dpo precompute-ref --help`)")
    pre = sub.add_parser("precompute-ref", help="store the reference model's logprobs with the data (once)",
                         description="Store the reference model's logprobs of each row's chosen and rejected "
                                     "responses with the data, so that training needs no reference forward.",
                         epilog=OVERRIDES_EPILOG)
    pre.add_argument("recipe", help="recipe YAML file (model and data.train_path of the preference rows)")
    pre.add_argument("--out", required=True, help="output jsonl: the rows with ref_chosen_logps and ref_rejected_logps")
    pre.add_argument("overrides", nargs="*", help="section.field=value recipe overrides")
    args, cfg = _recipe_and_overrides(p, argv)
    if cfg is None:
        return 2
    n, code = _exit_2_on_bad_input(lambda: precompute_reference(cfg, args.out))
    if code:
        return code
    print(f"{n} rows with reference logprobs written to {args.out}; train with algorithm.dpo.precomputed_reference=true")
    return 0


def _cmd_tpo(argv: list[str]) -> int:
    from r1_mm.config.doc import OVERRIDES_EPILOG
    from r1_mm.jobs.build_tpo import TPOSettings, build_tpo_pairs

    p = argparse.ArgumentParser(prog="r1-mm tpo", description=(
        "Temporal Preference Optimization: `build` writes preference pairs from a recipe's video rows "
        "(the policy answers from a segment vs the video without it, and from all frames vs a sparse subset)."))
    sub = p.add_subparsers(dest="action", required=True, help="the tool (`r1-mm tpo build --help`)")
    b = sub.add_parser("build", help="write preference pairs from a recipe's video rows", epilog=OVERRIDES_EPILOG)
    b.add_argument("recipe", help="recipe YAML (model, data.train_path, media, rollout engine)")
    b.add_argument("--out", required=True, help="output jsonl of preference pairs")
    b.add_argument("--kinds", default="localized,comprehensive",
                   help="comma-separated pair kinds: localized (rows with a segment: the segment vs the video "
                        "without it), comprehensive (all frames vs degraded frames)")
    b.add_argument("--degrade", choices=["sparse", "shuffle"], default="sparse",
                   help="comprehensive pairs: the dispreferred answer sees a sparse subset of frames or shuffled frames")
    b.add_argument("--keep-fraction", type=float, default=0.25, help="--degrade sparse: share of frames kept")
    b.add_argument("--agreement", choices=["rule", "critic"], default="rule",
                   help="how agreeing answers (no preference, pair dropped) are found: rule = same normalised "
                        "text, critic = a pairwise judge calls it a tie")
    b.add_argument("--critic-url", default="http://127.0.0.1:8000/v1", help="with --agreement critic")
    b.add_argument("overrides", nargs="*", help="section.field=value recipe overrides")
    args, cfg = _recipe_and_overrides(p, argv)
    if cfg is None:
        return 2
    settings = TPOSettings(kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()), degrade=args.degrade,
                           keep_fraction=args.keep_fraction, agreement=args.agreement,
                           critic_kwargs={"base_url": args.critic_url} if args.agreement == "critic" else {},
                           seed=cfg.training.seed)
    report, code = _exit_2_on_bad_input(lambda: build_tpo_pairs(cfg, args.out, settings))
    if code:
        return code
    print(f"{report.written} pairs written to {args.out} ({dict(report.counts)})")
    return 0


def _cmd_config(argv: list[str]) -> int:
    from r1_mm.config.doc import DOC_COMMAND, config_doc

    p = argparse.ArgumentParser(prog="r1-mm config", description=(
        "Document the recipe schema: every section and field with its type, default and help."),
        epilog=f"docs/config.md is this output ({DOC_COMMAND}).")
    p.add_argument("--doc", action="store_true", help="print the recipe reference (markdown) and exit")
    args = p.parse_args(argv)
    if not args.doc:
        p.print_help(sys.stderr)
        return 2
    print(config_doc(), end="")
    return 0


COMMANDS = {
    "train": (_cmd_train, "train a policy from a recipe (same as accelerate launch -m r1_mm.train)"),
    "launch": (_cmd_launch, "train on several processes: accelerate launch CONFIG, with a clean Ctrl-C"),
    "rollout": (_cmd_rollout, "sample completions for a recipe's data without training"),
    "demo": (_cmd_demo, "build the tiny model and synthetic data, then run the demo recipe"),
    "plot": (_cmd_plot, "draw a run's metrics to a PNG"),
    "compare": (_cmd_compare, "when did each run reach a target (trailing mean of a metric >= threshold)"),
    "make-tiny": (_cmd_make_tiny, "build a tiny offline model of a supported family (make-tiny --help lists them)"),
    "check-model": (_cmd_check_model, "check a model's sampler/learner contract on synthetic rows (exit 1 on a mismatch)"),
    "make-data": (_cmd_make_data, "write a synthetic image/video task"),
    "rewards": (_cmd_rewards, "list rewards, or check one on sample rows"),
    "tools": (_cmd_tools, "list tools (agentic rollouts), or call one on a row of your data"),
    "sweep": (_cmd_sweep, "run every combination of a grid of overrides x seeds"),
    "eval": (_cmd_eval, "score a checkpoint on the eval split with the recipe's rewards"),
    "dpo": (_cmd_dpo, "preference-data tools (precompute-ref)"),
    "tpo": (_cmd_tpo, "build Temporal Preference Optimization pairs from video rows"),
    "plan": (_cmd_plan, "estimate the memory per learner process of a recipe (before renting GPUs)"),
    "serve": (_cmd_serve, "run a vLLM server: critic (OpenAI-compatible) or rollout (vllm_pool)"),
    "config": (_cmd_config, "print every recipe field with its type, default and help (--doc)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        lines = ["usage: r1-mm COMMAND [ARGS]", "", "RL post-training for image and video language models.", "",
                 "commands:"]
        width = max(len(name) for name in COMMANDS)
        lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        lines += ["", "Run `r1-mm COMMAND --help` for a command's options."]
        print("\n".join(lines))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from r1_mm.core.registry import suggest

        print(f"r1-mm: unknown command '{name}'" + suggest(name, COMMANDS, listing=None), file=sys.stderr)
        return 2
    return COMMANDS[name][0](rest)


if __name__ == "__main__":
    sys.exit(main())
