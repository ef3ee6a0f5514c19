"""What each algorithm needs, said once: the entries the recipe checks, the load checks, the planner
and the trainers read instead of comparing ``algorithm.name`` with strings.

Before this table, "is this GRPO?" was asked in seven places with seven spellings (``== "grpo"``,
``in ("dpo", "tpo")``, ``in ("grpo", "iterative_dpo")``...); a new algorithm had to find them all.
Now an algorithm is one :class:`AlgorithmSpec` registered here (the facts a recipe can be checked
against, before any model loads) plus its trainer, registered under the same name in
:mod:`r1_mm.trainers.registry`; ``tests/test_algorithms.py`` checks the two tables name the same
algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1_mm.core.registry import Registry


@dataclass(frozen=True)
class AlgorithmSpec:
    """What an algorithm needs from the recipe, the data and the rollout engine."""

    name: str
    summary: str
    groups: bool = False
    """G completions per prompt scored against each other (group-relative advantages): G >= 2."""
    samples_while_training: bool = False
    """It samples from the current policy during training (so temperature 0 would give G equal answers)."""
    pairs_in_rows: bool = False
    """The training rows carry ``chosen`` and ``rejected`` responses (or their precomputed reference logprobs)."""
    preference_loss: bool = False
    """A DPO-family loss over two responses of one prompt (the planner counts G = 2)."""
    reads_sampler_logprobs: bool = False
    """Its importance weights (``algorithm.grpo.rollout_is``) read the sampler's logprobs, which must then be
    the distribution the learner scores (no repetition penalty the learner cannot reproduce)."""
    policy_losses: bool = False
    """It takes ``algorithm.grpo.loss_type`` and ``algorithm.grpo.advantage_estimator`` from the loss registries."""
    reference_each_round: bool = False
    """The reference restarts from the policy every round (``algorithm.iterative_dpo.reference_from_policy_each_round``),
    so checkpoints must carry it."""
    uses_rewards: bool = False
    """Reward functions (verifiable or the critic) score its samples."""
    runs_tools: bool = False
    """Its trajectories may call the recipe's tools (``tools.functions``): GRPO samples them, SFT replays a row's."""
    responses_in_rows: bool = False
    """The training rows carry the response to learn (``algorithm.sft.response_field`` or ``turns_field``)."""


ALGORITHMS: Registry[AlgorithmSpec] = Registry("algorithm")


def register_algorithm(spec: AlgorithmSpec) -> AlgorithmSpec:
    return ALGORITHMS.register(spec.name, spec)


def algorithm_spec(name: str) -> AlgorithmSpec:
    """The entry of ``algorithm.name`` (an unknown name is refused with the closest known one)."""
    return ALGORITHMS.get(name)


register_algorithm(AlgorithmSpec(
    "grpo", "Group Relative Policy Optimization on rewards (R1-Zero style), with DAPO/Dr.GRPO losses and T-GRPO",
    groups=True, samples_while_training=True, reads_sampler_logprobs=True, policy_losses=True, uses_rewards=True,
    runs_tools=True))
register_algorithm(AlgorithmSpec(
    "dpo", "Direct Preference Optimization on chosen / rejected rows", pairs_in_rows=True, preference_loss=True))
register_algorithm(AlgorithmSpec(
    "tpo", "Temporal Preference Optimization: DPO on pairs built from full vs partial video views, plus NLL",
    pairs_in_rows=True, preference_loss=True))
register_algorithm(AlgorithmSpec(
    "iterative_dpo", "Rounds of sampling, scoring (e.g. the LMM critic), best-vs-worst pairs and DPO",
    samples_while_training=True, preference_loss=True, reference_each_round=True, uses_rewards=True))
register_algorithm(AlgorithmSpec(
    "sft", "Supervised fine-tuning on the rows' responses (or tool-calling turns): an SFT cold start before GRPO",
    responses_in_rows=True, runs_tools=True))
register_algorithm(AlgorithmSpec(
    "distill", "On-policy distillation: the student samples, a teacher with the same tokenizer scores every token "
    "(per-token reverse KL or generalised JSD)", samples_while_training=True))
