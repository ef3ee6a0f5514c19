"""The ``r1-mm`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _cmd_train(argv: list[str]) -> int:
    from r1_mm.train import main

    return main(argv, prog="r1-mm train")


def _cmd_rollout(argv: list[str]) -> int:
    from r1_mm.config import ConfigError
    from r1_mm.rollout.job import run_rollouts
    from r1_mm.train import resolve

    try:
        cfg, _ = resolve(argv, prog="r1-mm rollout")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_dir = run_rollouts(cfg)
    print(f"rollouts written to {run_dir}/completions.jsonl, metrics to {run_dir}/metrics.jsonl")
    return 0


def make_demo_data(out: Path, rows: int, seed: int) -> Path:
    from r1_mm.testing.synthetic import make_counting_task

    # 56x56 images: 1-4 squares, each on one of the 2x2 visual tokens (28-px cells)
    return make_counting_task(out, rows, seed=seed, min_count=1, max_count=4, size=56, box=20, gap=8)


def _cmd_demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="r1-mm demo", description=(
        "Build the tiny offline model and synthetic counting data, then run the demo recipe."))
    p.add_argument("--out", default="runs/demo", help="run folder (data, metrics, checkpoints)")
    p.add_argument("--recipe", default=str(REPO_RECIPES / "demo_counting_grpo.yaml"))
    p.add_argument("--rows", type=int, default=512, help="synthetic rows to generate")
    p.add_argument("overrides", nargs="*", help="key.sub=value recipe overrides")
    args = p.parse_args(argv)
    out = Path(args.out)
    data = make_demo_data(out / "data", args.rows, seed=0)
    print(f"demo: synthetic data in {data}")
    overrides = [f"data.train_path={data}", f"training.output_dir={out}", *args.overrides]
    if "rollout" in Path(args.recipe).stem:
        return _cmd_rollout([args.recipe, *overrides])
    code = _cmd_train([args.recipe, *overrides])
    if code == 0:
        from r1_mm.plotting import plot_run

        print(f"demo: curves in {plot_run(out)}")
    return code


def _cmd_make_tiny(argv: list[str]) -> int:
    from r1_mm.testing.tiny_models import FAMILIES, TinySpec, build_tiny_model

    p = argparse.ArgumentParser(prog="r1-mm make-tiny", description="Build a tiny random-weight VLM offline.")
    p.add_argument("family", choices=FAMILIES)
    p.add_argument("out")
    p.add_argument("--small-vocab", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = build_tiny_model(args.out, TinySpec(family=args.family, small_vocab=args.small_vocab, seed=args.seed))
    print(path)
    return 0


def _cmd_make_data(argv: list[str]) -> int:
    from r1_mm.testing import synthetic

    tasks = {"counting": synthetic.make_counting_task, "spatial": synthetic.make_spatial_task,
             "events": synthetic.make_event_video_task, "multi_image": synthetic.make_multi_image_task}
    p = argparse.ArgumentParser(prog="r1-mm make-data", description="Write a synthetic task (media + jsonl).")
    p.add_argument("task", choices=sorted(tasks))
    p.add_argument("out")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(tasks[args.task](args.out, args.rows, seed=args.seed))
    return 0


def _cmd_plot(argv: list[str]) -> int:
    from r1_mm.plotting import plot_run

    p = argparse.ArgumentParser(prog="r1-mm plot", description="Draw a run's metrics.jsonl to a PNG.")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p.add_argument("--smooth", type=int, default=20, help="moving-average window in steps")
    args = p.parse_args(argv)
    print(plot_run(args.run_dir, args.out, smooth=args.smooth))
    return 0


COMMANDS = {
    "train": (_cmd_train, "train a policy from a recipe (same as accelerate launch -m r1_mm.train)"),
    "rollout": (_cmd_rollout, "sample completions for a recipe's data without training"),
    "demo": (_cmd_demo, "build the tiny model and synthetic data, then run the demo recipe"),
    "plot": (_cmd_plot, "draw a run's metrics to a PNG"),
    "make-tiny": (_cmd_make_tiny, "build a tiny offline Qwen2-VL / Qwen2.5-VL"),
    "make-data": (_cmd_make_data, "write a synthetic image/video task"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        lines = ["usage: r1-mm COMMAND [ARGS]", "", "RL post-training for image and video language models.", "",
                 "commands:"]
        lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        lines += ["", "Run `r1-mm COMMAND --help` for a command's options."]
        print("\n".join(lines))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        print(f"r1-mm: unknown command '{name}'" + (f"; did you mean '{close[0]}'?" if close else ""), file=sys.stderr)
        return 2
    return COMMANDS[name][0](rest)


if __name__ == "__main__":
    sys.exit(main())
