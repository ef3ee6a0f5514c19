"""Training entry point shared by ``r1-mm train`` and ``accelerate launch -m r1_mm.train``.

Both routes call :func:`main` with the same argument list, so a recipe and its overrides resolve
identically however the run is launched.
"""

from __future__ import annotations

import argparse
import sys

from r1_mm.config.doc import OVERRIDES_EPILOG
from r1_mm.config.recipe import ConfigError, RecipeConfig, dump_recipe, load_recipe


def parser(prog: str = "r1-mm train", description: str = "Train a policy from a recipe YAML.") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=OVERRIDES_EPILOG)
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. algorithm.grpo.beta=0.0")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    return p


def resolve(argv: list[str] | None, prog: str = "r1-mm train",
            description: str = "Train a policy from a recipe YAML.") -> tuple[RecipeConfig, argparse.Namespace]:
    """The recipe and the options; ``key=value`` overrides may come before or after the options."""
    args = parser(prog, description).parse_intermixed_args(argv)
    return load_recipe(args.recipe, args.overrides), args


def main(argv: list[str] | None = None, prog: str = "python -m r1_mm.train") -> int:
    try:
        cfg, args = resolve(argv, prog)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_recipe(cfg), end="")
        return 0
    import r1_mm.trainers  # noqa: F401  (registers the learners)
    from r1_mm.trainers.registry import TRAINERS

    if cfg.algorithm.name not in TRAINERS:
        print(f"error: no learner is registered for algorithm.name={cfg.algorithm.name!r} in this version "
              f"(available: {', '.join(TRAINERS.names()) or 'none'}); `r1-mm rollout RECIPE` runs the "
              "rollout-only job", file=sys.stderr)
        return 2
    trainer = TRAINERS.get(cfg.algorithm.name)
    from r1_mm.data.loading import DataError
    from r1_mm.trainers.base import TrainingInterrupted

    try:
        trainer(cfg)
    except (ConfigError, DataError) as exc:  # recipe, machine and data problems: found before the model loads
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        if exc.main_process:
            print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    return 0
