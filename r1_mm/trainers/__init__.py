"""Learners (GRPO, DPO, TPO); importing this package registers them in r1_mm.train.TRAINERS."""

from r1_mm.trainers import (
    grpo,  # noqa: F401
    iterative_dpo,  # noqa: F401
    preference,  # noqa: F401
)
