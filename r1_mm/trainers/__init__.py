"""Learners (GRPO, DPO, TPO) register themselves in r1_mm.train.TRAINERS on import."""
