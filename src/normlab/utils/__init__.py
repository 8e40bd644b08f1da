"""Small helpers of the entry points: checkpoints and results."""
