"""Training entry points (pretraining, SFT, RL)."""
