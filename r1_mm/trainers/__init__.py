"""Learners (GRPO, DPO, TPO, SFT, distillation); importing this package registers them in r1_mm.trainers.registry.TRAINERS."""

from r1_mm.trainers import (
    distill,  # noqa: F401
    grpo,  # noqa: F401
    iterative_dpo,  # noqa: F401
    preference,  # noqa: F401
    sft,  # noqa: F401
)
