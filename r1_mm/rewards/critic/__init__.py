"""LMM-critic rewards (LLaVA-Critic style): a judge model scores or compares responses, media included."""
