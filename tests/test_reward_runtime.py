"""Where rewards run and how they are stopped: a hung reward is killed in its worker process and costs
only itself, a batch has a time budget that accuracy's math checks honour, math-verify verdicts are
cached, and a run (or a training run sent SIGTERM) with a hung reward still exits.

No wall-clock assertions: each test asserts the mechanism (the worker process is gone, by pid; the
value is None or 0; the check was skipped or answered from the cache). Timings are in bench/rewards.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from r1_mm.config.recipe import ConfigError, RewardSpec, load_recipe
from r1_mm.rewards import math_check
from r1_mm.rewards.math_check import MathChecker
from r1_mm.rewards.registry import RewardError
from r1_mm.rewards.runner import RewardRunner

from .conftest import REPO

BIN = Path(sys.executable).parent
BOMB = "$\\gcd(10^{100000}!, 7)$"  # sympy needs ~8 s for this: math-verify's check is killed at its limit

HANGING = """
import os
import time


def spin(completions, pid_file, **_):
    with open(pid_file, "a") as f:
        f.write(f"{os.getpid()}\\n")
    while True:
        pass


def sleep(completions, pid_file, **_):
    with open(pid_file, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(10**6)


def length(completions, **_):
    return [float(len(c)) for c in completions]
"""


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    path = tmp_path / "hanging.py"
    path.write_text(HANGING)
    return path


def gone(pid: int) -> bool:
    """The process no longer exists (or is a zombie nobody has reaped yet: it runs no code)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def score(runner: RewardRunner, completions: list[str], solutions: list[str]):
    return runner(prompts=[""] * len(completions), completions=completions, completion_ids=[[0]] * len(completions),
                  rows=[{"solution": s} for s in solutions], row_ids=[f"row-{i}" for i in range(len(completions))])


@pytest.mark.parametrize("hang", ["spin", "sleep"])
def test_a_hung_reward_is_killed_and_costs_only_itself(plugin, tmp_path, hang):
    """Five batches (more than the old pool's four threads): every time the hung reward's worker is killed
    (its pid is gone) and scores None, while the file plugin and the built-in beside it keep real values."""
    pids = tmp_path / "pids"
    runner = RewardRunner([RewardSpec(name=f"{plugin}:{hang}", kwargs={"pid_file": str(pids)}),
                           RewardSpec(name=f"{plugin}:length"), RewardSpec(name="numeric")],
                          on_error="none", timeout_s=1.5)
    try:
        assert runner.workers[0] is not None and runner.workers[1] is not None  # auto: plugins run in workers
        assert runner.workers[2] is None  # a built-in runs inline
        for _ in range(5):
            batch = score(runner, ["<answer>3</answer>", "<answer>4</answer>"], ["3", "3"])
            assert batch.per_function[:, 1].tolist() == [18.0, 18.0]
            assert batch.per_function[:, 2].tolist() == [1.0, 0.0]
            assert all(math.isnan(v) for v in batch.per_function[:, 0].tolist())
            assert batch.failures == {f"{plugin}:{hang}": 1}
        started = [int(p) for p in pids.read_text().split()]
        assert len(started) == 5 and os.getpid() not in started  # the premise: it ran in other processes
        assert all(gone(pid) for pid in started)
        assert runner.metrics()[f"rewards/{hang}/timeouts"] == 5.0  # under the function name
        assert runner.failure_counts[f"{plugin}:{hang}"] == 5
    finally:
        runner.close()
    assert all(gone(w.pid or 0) for w in runner.workers if w is not None)


def test_a_timeout_under_on_error_raise_names_the_reward_and_the_limit(plugin, tmp_path):
    runner = RewardRunner([RewardSpec(name=f"{plugin}:sleep", kwargs={"pid_file": str(tmp_path / "pids")})],
                          timeout_s=0.5)
    try:
        with pytest.raises(RewardError, match=r"reward '.*:sleep' failed on rows \[row-0\]: RewardError: took longer "
                                              r"than rewards.timeout_s=0.5 s; its worker process was killed"):
            score(runner, ["a"], ["3"])
        assert gone(int((tmp_path / "pids").read_text().split()[0]))
    finally:
        runner.close()


def test_a_reward_error_in_a_worker_reads_as_it_does_inline(tmp_path):
    path = tmp_path / "errors.py"
    path.write_text("from r1_mm.rewards.parsing import RowError\n\n"
                    "def second_row(completions, **_):\n    raise RowError(1, 'cannot parse this row')\n")
    runner = RewardRunner([RewardSpec(name=f"{path}:second_row", isolation="process")])
    try:
        with pytest.raises(RewardError, match=r"failed on rows \[row-1\]: RowError: cannot parse this row"):
            score(runner, ["a", "b"], ["3", "3"])
    finally:
        runner.close()


def test_a_script_with_hung_rewards_exits(plugin, tmp_path):
    """Timed-out calls leave nothing that keeps the interpreter alive: the worker is killed at exit and
    an inline call (a Python object cannot go to a worker) is left in a daemon thread. Before, a
    thread pool's thread running the call kept the script from ever exiting."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from r1_mm.config.recipe import RewardSpec
        from r1_mm.rewards import registry
        from r1_mm.rewards.runner import RewardRunner

        def stuck(completions, **_):
            while True:
                pass

        registry.REGISTRY.register("stuck", stuck, origin="object __main__:stuck")
        runner = RewardRunner([RewardSpec(name="{plugin}:spin", kwargs={{"pid_file": "{tmp_path / 'pids'}"}}),
                               RewardSpec(name="stuck"), RewardSpec(name="{plugin}:length")],
                              on_error="none", timeout_s=3.0)
        batch = runner(prompts=[""], completions=["abc"], completion_ids=[[0]], rows=[{{}}], row_ids=["r"])
        print(batch.per_function.tolist())
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[0] == "[[nan, nan, 3.0]]"
    assert all(gone(int(p)) for p in (tmp_path / "pids").read_text().split())


def test_isolation_process_of_a_python_object_is_refused_at_load(tmp_path, synthetic_data):
    from r1_mm.rewards import registry
    from r1_mm.run import input_checks

    registry.REGISTRY.register("closure_reward", lambda completions, **_: [1.0] * len(completions),
                               origin="object __main__:closure_reward")
    try:
        spec = RewardSpec(name="closure_reward", isolation="process")
        with pytest.raises(RewardError, match="closure_reward': isolation=process runs the reward in a worker process "
                                              "that finds it by name.*set isolation: inline"):
            RewardRunner([spec])
        problems, _ = input_checks.reward_problems([spec])
        assert len(problems) == 1 and problems[0].startswith("rewards.functions[0] (closure_reward): isolation=process")
        assert RewardRunner([RewardSpec(name="closure_reward")], timeout_s=1.0).workers == [None]  # auto: inline
    finally:
        registry.REGISTRY.remove("closure_reward")
    with pytest.raises(ConfigError, match=r"rewards.batch_timeout_s must be > 0, got 0"):
        load_recipe(None, ["rewards.batch_timeout_s=0"])


def test_the_batch_budget_stops_accuracy_checks_and_kills_a_slow_reward(plugin, tmp_path):
    """A batch of distinct LaTeX bombs under a 6 s budget: accuracy skips the checks that no longer fit
    (counted) and still returns real values (the exact answers score 1), while a reward still running
    at the budget is killed and scores None. Each bomb alone would take its 5 s per-check limit."""
    checker = math_check.checker()
    skipped_before = checker.over_budget
    bombs = [f"<answer>\\gcd(10^{{{100000 + k}}}!, 7)</answer>" for k in range(6)]
    runner = RewardRunner([RewardSpec(name="accuracy", kwargs={"timeout_seconds": 5}),
                           RewardSpec(name=f"{plugin}:sleep", kwargs={"pid_file": str(tmp_path / "pids")})],
                          on_error="none", batch_timeout_s=6.0)
    try:
        batch = score(runner, [*bombs, "<answer>1</answer>", "<answer>1.</answer>"], ["1"] * 8)
    finally:
        runner.close()
    assert batch.per_function[:, 0].tolist() == [0.0] * 6 + [1.0, 1.0]
    assert all(math.isnan(v) for v in batch.per_function[:, 1].tolist())
    assert batch.failures == {f"{plugin}:sleep": 1}
    assert checker.over_budget > skipped_before  # the premise: checks were skipped for the budget
    assert runner.metrics()["rewards/math_verify/over_budget"] == float(checker.over_budget)
    assert runner.timeout_counts == {"accuracy": 0, f"{plugin}:sleep": 1}
    assert gone(int((tmp_path / "pids").read_text().split()[0]))


def test_math_verdicts_are_cached_and_a_bomb_costs_its_limit_once(monkeypatch):
    # a bomb of its own: verdicts are cached for the whole process, and other tests check BOMB too
    bomb = BOMB.replace(", 7)", ", 11)")
    checker = MathChecker()
    checks = []
    real = checker._check
    monkeypatch.setattr(checker, "_check", lambda *a: checks.append(a[0]) or real(*a))
    try:
        assert checker.equivalent("$\\frac{1}{2}$", "$0.5$", 30.0)
        assert checker.equivalent("$\\frac{1}{2}$", "$0.5$", 30.0)
        first = checker._process.pid
        assert checker.equivalent(bomb, "$1$", 1.0) is False
        # the limit is enforced twice, and the two race at 1 s: the worker's own math-verify timeout
        # (it answers False) or the parent's hard limit (the worker is killed, a new one started)
        if checker.timeouts:
            assert checker.timeouts == 1 and gone(first) and checker._process.pid != first
        else:
            assert checker._process.pid == first and not gone(first)
        assert checker.equivalent(bomb, "$1$", 1.0) is False
        assert checks == ["$\\frac{1}{2}$", bomb]  # each pair reached math-verify once: the verdict is cached
    finally:
        checker.close()


@pytest.mark.slow
def test_sigterm_with_a_hung_reward_saves_and_exits(plugin, tmp_path, synthetic_data, tiny_cache):
    """A training run whose reward hangs at every step: SIGTERM still ends it with a checkpoint and the
    resume hint (exit 128 + SIGTERM), the healthy reward logged real means, and no worker outlives
    it. Before, the hung call's thread kept the process alive after the checkpoint (14.8 min, killed)."""
    out, pids = tmp_path / "run", tmp_path / "pids"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""
        model: {{name_or_path: "tiny:qwen2_5_vl:small"}}
        data: {{format_instruction: null}}
        media: {{max_pixels: 3136, min_pixels: 3136}}
        rollout: {{num_generations: 2, max_completion_length: 2}}
        rewards:
          on_error: none
          timeout_s: 2
          functions:
            - {{name: "{plugin}:sleep", kwargs: {{pid_file: "{pids}"}}}}
            - {{name: "{plugin}:length"}}
        training: {{max_steps: 500, prompts_per_step: 1, save_steps: null}}
        logging: {{progress_bar: false}}
    """))
    cmd = [str(BIN / "r1-mm"), "train", str(recipe), f"data.train_path={synthetic_data['counting']}",
           f"training.output_dir={out}"]
    env = {**os.environ, "R1MM_CACHE": str(tiny_cache.parent), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 600  # a guard against a hang, not a timing
        while time.monotonic() < deadline and not (metrics.exists() and '"step": 1,' in metrics.read_text()):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.1)
        assert '"step": 1,' in metrics.read_text()  # the premise: steps with the hung reward ran
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)  # a deadline so that a hang fails instead of stalling CI
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(list((out / "checkpoints").iterdir())) == 1
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert all(math.isfinite(m["rewards/length/mean"]) for m in logged)  # under the function name
    assert logged[-1]["rewards/sleep/timeouts"] >= 2
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) >= 2 and all(gone(pid) for pid in started)
