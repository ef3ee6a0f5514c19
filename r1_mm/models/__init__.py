"""Models: loading, weight naming and sync formats, tiny models, and the forward (grouped forward, packed attention, token scores)."""
