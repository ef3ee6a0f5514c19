"""``r1-mm launch CONFIG RECIPE [OVERRIDES]``: ``accelerate launch --config_file CONFIG -m r1_mm.train
RECIPE OVERRIDES`` run in this process, ending a Ctrl-C or SIGTERM the way ``r1-mm train`` does.

Why: a multi-process ``accelerate launch`` (DDP, DeepSpeed) is torch's elastic agent. On SIGINT or
SIGTERM the agent forwards the signal to the workers, which finish their step, save a checkpoint,
print the one resume line and exit with 128 + the signal; then the agent re-raises the signal as
``SignalException``, so the run ended with a traceback from torch.distributed.elastic under that
line and exit code 1. Here that exception is the expected end: the launcher exits 128 + the signal.
The agent also SIGKILLs workers still running 30 s after the signal (TORCH_ELASTIC_SHUTDOWN_TIMEOUT),
less than saving a real model under ZeRO-3 can take: here they get ``--shutdown-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from r1_mm.config.doc import OVERRIDES_EPILOG

    p = argparse.ArgumentParser(prog="r1-mm launch", description=(
        "accelerate launch --config_file CONFIG -m r1_mm.train RECIPE OVERRIDES, in this process: "
        "Ctrl-C / SIGTERM save a checkpoint and exit with 128 + the signal, without a launcher traceback."),
        epilog=OVERRIDES_EPILOG)
    p.add_argument("config", help="accelerate config YAML, e.g. recipes/accelerate/zero3.yaml")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. algorithm.grpo.beta=0.0")
    p.add_argument("--shutdown-timeout", type=int, default=1800,
                   help="seconds the workers get to save after a signal before they are killed (default 1800)")
    args = p.parse_args(argv)

    from r1_mm.config.recipe import ConfigError, load_recipe

    try:  # a recipe mistake is one line here, not one traceback per worker
        load_recipe(args.recipe, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(args.shutdown_timeout))
    launch = launch_command_parser().parse_args(["--config_file", args.config, "-m", "r1_mm.train", args.recipe,
                                                 *args.overrides])
    try:
        launch_command(launch)
    except SignalException as exc:  # the workers saved and said how to resume
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:  # the failing worker printed its own error above
        rank, failure = next(iter(exc.failures.items()))
        print(f"error: worker rank {rank} exited with code {failure.exitcode} (its output is above)", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
