"""r1-mm: RL post-training for image and video language models."""
__version__ = "0.1.0"
