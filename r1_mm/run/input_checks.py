"""Everything about a run's inputs that can be checked before the model loads, checked there.

Why: a typo in a reward's kwargs used to be swallowed by the reward's ``**kwargs`` (it scored 0
forever), an unknown loss name or a row without ``solution`` surfaced minutes later as a traceback,
or not at all, depending on which rows a batch drew. Here the recipe's names are looked up in the
registries that will serve them, each reward's kwargs are matched against its signature, and every
row is checked for the columns the configured rewards and algorithm need. Problems come back as
one line each, naming the file, row, field and what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from r1_mm.config.algorithms import algorithm_spec
from r1_mm.config.recipe import ConfigError, RecipeConfig, RewardSpec
from r1_mm.core.registry import suggest
from r1_mm.data.loading import DataError
from r1_mm.data.prompts import PROMPT_KEYS, media_refs, row_id
from r1_mm.data.row_checks import row_problems as data_row_problems
from r1_mm.rewards.signature import PASSED_BY_RUNNER, explicit_parameters, needed_columns


def name_problems(cfg: RecipeConfig) -> list[str]:
    """Registry-backed names (third-party code can add to these registries, so they are not Literals)."""
    from r1_mm.rollout.engines import ENGINES
    from r1_mm.trainers.losses import ADVANTAGE_ESTIMATORS, LOSS_TYPES

    problems = []
    engines = ENGINES.names()
    if cfg.rollout.engine not in engines:
        problems.append(f"rollout.engine '{cfg.rollout.engine}' is not an engine" + suggest(cfg.rollout.engine, engines))
    if algorithm_spec(cfg.algorithm.name).policy_losses:
        if cfg.algorithm.grpo.loss_type not in LOSS_TYPES:
            problems.append(f"algorithm.grpo.loss_type '{cfg.algorithm.grpo.loss_type}' is not a loss"
                            + suggest(cfg.algorithm.grpo.loss_type, list(LOSS_TYPES)))
        if cfg.algorithm.grpo.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            problems.append(f"algorithm.grpo.advantage_estimator '{cfg.algorithm.grpo.advantage_estimator}' is not an estimator"
                            + suggest(cfg.algorithm.grpo.advantage_estimator, list(ADVANTAGE_ESTIMATORS)))
    return problems


def kwarg_problems(fn: Any, kwargs: dict[str, Any], where: str, forwarded_to: list[Any] = ()) -> list[str]:
    """A recipe kwarg must be a parameter the reward names: its ``**kwargs`` receives the rows' columns,
    so a misspelt option would vanish into it. Functions that name no option at all (everything through
    ``**kwargs``) cannot be checked, and are trusted. ``forwarded_to``: rewards that receive the options
    this one does not take itself (by_problem_type passes them to every reward it routes to)."""
    names = explicit_parameters(fn)
    if names is None:
        return []
    for target in forwarded_to:
        names |= explicit_parameters(target) or set()
    options = names - set(PASSED_BY_RUNNER)
    problems = []
    for key in kwargs:
        if key not in names and options:
            problems.append(f"{where}.kwargs.{key} is not an option of this reward" + suggest(key, sorted(options)))
    return problems


def spec_problems(spec: RewardSpec, where: str) -> tuple[list[str], set[str]]:
    """(problems, columns every row needs) of one configured reward: its name resolves, it can run where
    its isolation setting asks, its kwargs are options it takes, and so for the rewards it routes to
    (``r1-mm rewards check`` asks the same)."""
    from r1_mm.rewards.registry import REGISTRY, RewardError, get
    from r1_mm.rewards.worker import placement

    try:
        fn = get(spec.name)
    except RewardError as exc:
        return [f"{where}: {exc}"], set()
    problems: list[str] = []
    try:
        placement(spec.name, REGISTRY.origin(spec.name), spec.isolation, limited=True)
    except ValueError as exc:
        problems.append(f"{where}: {exc}")
    nested: list[RewardSpec] = []
    if callable(getattr(fn, "nested_specs", None)):  # by_problem_type: the rewards it routes to
        try:
            nested = [RewardSpec(name=name, kwargs=kw) for name, kw in fn.nested_specs(spec.kwargs)]
        except RewardError as exc:
            problems.append(f"{where}: {exc}")
    routed = []
    for n in nested:
        try:
            routed.append(get(n.name))
        except RewardError:
            pass  # reported by the nested check below
    problems += kwarg_problems(fn, spec.kwargs, where, routed)
    if nested:
        problems += reward_problems(nested, f"{where}.routes")[0]
    return problems, needed_columns(fn, spec.kwargs)


def reward_problems(specs: list[RewardSpec], section: str = "rewards.functions") -> tuple[list[str], dict[str, set[str]]]:
    """(problems, {column: rewards that need it}) for the configured rewards."""
    problems: list[str] = []
    needs: dict[str, set[str]] = {}
    for i, spec in enumerate(specs):
        found, columns = spec_problems(spec, f"{section}[{i}] ({spec.name})")
        problems += found
        for column in columns:
            needs.setdefault(column, set()).add(spec.name)
    return problems, needs


def algorithm_columns(cfg: RecipeConfig) -> dict[str, set[str]]:
    a = cfg.algorithm
    out: dict[str, set[str]] = {}
    if algorithm_spec(a.name).pairs_in_rows:
        for column in ("chosen", "rejected"):
            out.setdefault(column, set()).add(f"algorithm.name={a.name}")
        if a.dpo.precomputed_reference:
            for column in ("ref_chosen_logps", "ref_rejected_logps"):
                out.setdefault(column, set()).add("algorithm.dpo.precomputed_reference")
    return out


def sft_problems(cfg: RecipeConfig, rows: list[dict[str, Any]], path: str | Path) -> list[str]:
    """Every SFT row has its response (non-empty text) or its turns (a non-empty list of non-empty texts, which
    need tools.functions to run their calls, and at most tools.max_turns of them)."""
    a, tools = cfg.algorithm.sft, cfg.tools
    for i, row in enumerate(rows):
        where = f"{path}: row {i} (id {row_id(row, i)})"
        if a.turns_field in row:
            turns = row[a.turns_field]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
                return [f"{where}: field '{a.turns_field}' must be a non-empty list of non-empty strings, got {turns!r}"]
            if len(turns) > 1 and not tools.functions:
                return [f"{where} has {len(turns)} turns (tool calls) but the recipe has no tools.functions to run them"]
            if len(turns) > tools.max_turns:
                return [f"{where} has {len(turns)} turns, more than tools.max_turns ({tools.max_turns})"]
            continue
        text = row.get(a.response_field)
        if not isinstance(text, str) or not text.strip():
            return [f"{where}: needs '{a.response_field}' (a non-empty string; algorithm.sft.response_field) or "
                    f"'{a.turns_field}' (a list of model turns; algorithm.sft.turns_field), got "
                    f"{a.response_field}={text!r}"]
    return []


def row_problems(rows: list[dict[str, Any]], path: str | Path, needs: dict[str, set[str]]) -> list[str]:
    """The first row lacking a prompt or a needed column, per column (a key with a null value is a row
    the reward deliberately leaves unscored; a missing key is a data error)."""
    problems = []
    bad_prompt = next((i for i, r in enumerate(rows) if not any(k in r for k in PROMPT_KEYS)), None)
    if bad_prompt is not None:
        problems.append(f"{path}: row {bad_prompt} (id {row_id(rows[bad_prompt], bad_prompt)}) has no prompt; "
                        f"every row needs one of the columns {', '.join(PROMPT_KEYS)}")
    for column, users in sorted(needs.items()):
        missing = [i for i, r in enumerate(rows) if column not in r]
        if missing:
            first = missing[0]
            problems.append(f"{path}: row {first} (id {row_id(rows[first], first)}) and {len(missing) - 1} more have no "
                            f"'{column}' column, which {', '.join(sorted(users))} need(s); add it (null = not scored) "
                            "or drop what needs it")
    return problems


def preference_problems(rows: list[dict[str, Any]], path: str | Path) -> list[str]:
    """Every pair's responses are non-empty text (an empty one would be scored as a bare end token)."""
    for i, row in enumerate(rows):
        for column in ("chosen", "rejected"):
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                return [f"{path}: row {i} (id {row_id(row, i)}): field '{column}' must be a non-empty string, "
                        f"got {value!r}"]
    return []


def route_problems(specs: list[RewardSpec], rows: list[dict[str, Any]], source: str) -> list[str]:
    """Rewards that look at row values to decide what scores them (``row_problems(rows, kwargs)``, e.g.
    by_problem_type: a problem type with no route) are asked about every row now, not mid-run."""
    from r1_mm.rewards.registry import get

    problems = []
    for i, spec in enumerate(specs):
        hook = getattr(get(spec.name), "row_problems", None)
        if callable(hook):
            problems += [f"{source}: {p} (rewards.functions[{i}] ({spec.name}))" for p in hook(rows, spec.kwargs)]
    return problems


def video_problems(cfg: RecipeConfig, rows: list[dict[str, Any]], source: str) -> list[str]:
    """Video rows for a model family that refuses video (Gemma 3 takes no video), and rows with both images and
    a video where the family's vLLM model takes the video's frames as images (SmolVLM: one prompt's images share
    one processor setting, and the frames must not be split): one line naming the first such row and how many
    there are, before any model loads (the engine or the processor would otherwise fail at the first such prompt)."""
    from r1_mm.models.families import UnsupportedModelError, family_of
    from r1_mm.models.hub import read_model_config

    try:
        family = family_of(read_model_config(cfg.model))
    except (UnsupportedModelError, ConfigError, ValueError):  # unverified or unreadable: preflight says so
        return []
    if family.supports("video"):
        if family.vllm_video_as_images is None or not cfg.rollout.engine.startswith("vllm"):
            return []
        found = _rows_where(rows, lambda images, videos: bool(images) and bool(videos))
        return [f"{source}: row {found[0]} (and {len(found) - 1} more) has both images and a video, which "
                f"{family.display_name} ({family.model_type}) does not take on rollout.engine={cfg.rollout.engine}: "
                "vLLM's model takes the video's frames as unsplit images, and one prompt's images share one "
                "processor setting; split such rows or use rollout.engine=hf"] if found else []
    found = _rows_where(rows, lambda images, videos: bool(videos))
    if not found:
        return []
    return [f"{source}: row {found[0]} (and {len(found) - 1} more) has a video, and "
            f"{family.refusal('video')}; drop the video rows or pick another model"]


def _rows_where(rows: list[dict[str, Any]], test: Any) -> list[str]:
    """The ids of the rows whose (image refs, video refs) pass ``test``; rows whose media are unreadable are
    left to the prompt check."""
    found = []
    for index, row in enumerate(rows):
        try:
            if test(*media_refs(row)):
                found.append(row_id(row, index))
        except DataError:  # reported by the prompt check
            continue
    return found


def check(cfg: RecipeConfig, rows: list[dict[str, Any]] | None = None, source: str | None = None,
          media_root: Path | None = None) -> None:
    """Raise ConfigError (recipe) or DataError (rows) with every problem found; the rows are checked
    only when given (the trainer passes the rows it already read, ``source``, how to name them, and
    ``media_root``, where their relative media paths resolve)."""
    from r1_mm.run.tracking import tracker_problems

    problems = name_problems(cfg) + tracker_problems(cfg.logging.report_to)
    problems += [f"logging.tracker_kwargs '{name}' is not in logging.report_to {cfg.logging.report_to}"
                 for name in cfg.logging.tracker_kwargs if name not in cfg.logging.report_to]
    reward_found, needs = reward_problems(cfg.rewards.functions)
    problems += reward_found
    if cfg.tools.functions:
        from r1_mm.tools.registry import spec_problems as tool_spec_problems

        problems += tool_spec_problems(cfg.tools.functions)
    if problems:
        raise ConfigError("; ".join(problems))
    if rows is not None:
        for column, users in algorithm_columns(cfg).items():
            needs.setdefault(column, set()).update(users)
        source = source or cfg.data.train_path
        found = row_problems(rows, source, needs)
        if not found and algorithm_spec(cfg.algorithm.name).pairs_in_rows:
            found = preference_problems(rows, source)
        if not found and algorithm_spec(cfg.algorithm.name).responses_in_rows:
            found = sft_problems(cfg, rows, source)
        if not found:
            found = data_row_problems(cfg, rows, source, media_root) or route_problems(cfg.rewards.functions, rows, source)
        if not found:
            found = video_problems(cfg, rows, source)
        if found:
            raise DataError("; ".join(found))


def check_eval_split(cfg: RecipeConfig, dataset: Any = None, *, evaluating: bool = False) -> None:
    """The eval rows, as the training rows are, when the run will evaluate (``training.eval_steps``, or
    ``evaluating``: `r1-mm eval`): they are read lazily at the first evaluation, so a bad eval row used
    to stop the run at step eval_steps."""
    from r1_mm.data.loading import has_split, load_split, media_root

    if not (evaluating or cfg.training.eval_steps) or (dataset is None and not has_split(cfg.data, "eval")):
        return
    rows, source, default_root = load_split(cfg.data, "eval", dataset=dataset)
    check(cfg, rows[:cfg.training.eval_max_rows], source, media_root(cfg.data, default_root))


def check_generation_job(cfg: RecipeConfig, rows: list[dict[str, Any]], source: str, media_root: Path | None) -> None:
    """What a job that only samples (``r1-mm rollout``, ``r1-mm tpo build``) needs of the recipe and of
    every row: no reward runs, so no reward columns are required."""
    problems = name_problems(cfg)
    if cfg.tools.functions:
        from r1_mm.tools.registry import spec_problems as tool_spec_problems

        problems += tool_spec_problems(cfg.tools.functions)
    if problems:
        raise ConfigError("; ".join(problems))
    found = row_problems(rows, source, {}) or data_row_problems(cfg, rows, source, media_root) \
        or video_problems(cfg, rows, source)
    if found:
        raise DataError("; ".join(found))
