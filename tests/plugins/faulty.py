"""Rewards that misbehave on purpose, loaded by file path in the GRPO loop tests."""


def fails_on_row_1(completions, id, **kwargs):
    if "counting-1" in id:
        raise ValueError("cannot parse this row")
    return [0.0 for _ in completions]


def flat_on_even_rows(completions, id, **kwargs):
    # even rows: every completion scores 1 (a flat group); odd rows: alternating scores
    return [1.0 if int(i.rsplit("-", 1)[1]) % 2 == 0 else float(k % 2) for k, i in enumerate(id)]


def alternating(completions, **kwargs):
    # every group has rewards 0, 1, 0, 1, ...: always a learning signal
    return [float(k % 2) for k in range(len(completions))]
