"""Rewards that vary for a random tiny model, loaded by file path (``tests/plugins/test_rewards.py:fn``)."""


def length_reward(completions, **kwargs):
    """Longer completions score higher: a random policy still gets a non-zero learning signal."""
    return [len(c) / 10.0 for c in completions]
