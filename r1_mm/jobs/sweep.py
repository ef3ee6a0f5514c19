"""``r1-mm sweep``: every combination of grid values x seeds as its own run, named by what differs.

Each run gets ``logging.group`` (the sweep's name, so W&B groups them), ``logging.run_name`` such as
``beta=0.04,num_generations=8,seed=2`` and its own ``training.output_dir`` below the sweep folder.
"""

from __future__ import annotations

import itertools
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SweepRun:
    name: str
    overrides: tuple[str, ...]


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--grid {spec!r}: expected key.sub=v1,v2,...")
        grid.append((key.strip(), [v.strip() for v in values.split(",") if v.strip()]))
    return grid


def plan(grid: list[tuple[str, list[str]]], seeds: list[int], group: str, out_root: Path) -> list[SweepRun]:
    runs = []
    keys = [k for k, _ in grid]
    for combo in itertools.product(*[values for _, values in grid]):
        for seed in seeds:
            parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys, combo, strict=True)] + [f"seed={seed}"]
            name = ",".join(parts)
            overrides = tuple(f"{k}={v}" for k, v in zip(keys, combo, strict=True)) + (
                f"training.seed={seed}", f"logging.group={group}", f"logging.run_name={name}",
                f"training.output_dir={out_root / name}")
            runs.append(SweepRun(name, overrides))
    return runs


def launch_command(launcher: str, recipe: str, run: SweepRun, extra: list[str]) -> list[str]:
    return [*shlex.split(launcher), recipe, *run.overrides, *extra]


def run_sweep(recipe: str, grid_specs: list[str], seeds: list[int], *, out_root: str | None, group: str | None,
              launcher: str, extra: list[str], print_only: bool) -> int:
    group = group or Path(recipe).stem
    root = Path(out_root or f"runs/sweeps/{group}")
    runs = plan(parse_grid(grid_specs), seeds, group, root)
    failed = []
    for run in runs:
        cmd = launch_command(launcher, recipe, run, extra)
        if print_only:
            print(shlex.join(cmd))
            continue
        print(f"sweep: {run.name}", flush=True)
        if subprocess.call(cmd) != 0:
            failed.append(run.name)
    if failed:
        print(f"sweep: {len(failed)} of {len(runs)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
