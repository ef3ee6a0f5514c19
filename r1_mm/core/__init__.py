"""Lowest layer: the one registry, plugin loading, seeds, memory and process topology; imports no other r1_mm package."""
