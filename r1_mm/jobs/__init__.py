"""Commands that run inside one run context: train, rollout, tpo (build TPO pairs), eval, rewards check, plan, sweep, launch."""
