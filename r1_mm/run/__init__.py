"""A run's folder and records: lock, checkpoints, run_info.json, metrics and trackers, plots, preflight and input checks."""
