"""The learner's forward: grouped forward, packed attention, token scores (what rollout, evaluation and the trainers all score with)."""
