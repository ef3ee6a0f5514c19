"""Learners (GRPO, DPO, TPO, SFT); importing this package registers them in r1_mm.trainers.registry.TRAINERS."""

from r1_mm.trainers import (
    grpo,  # noqa: F401
    iterative_dpo,  # noqa: F401
    preference,  # noqa: F401
    sft,  # noqa: F401
)
