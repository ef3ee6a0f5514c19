"""Example reward plugin for r1-mm (see docs/reward-plugins.md)."""
