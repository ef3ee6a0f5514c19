"""Commands that run inside one run context: train, rollout, build-tpo, eval, rewards check, plan, sweep, launch."""
