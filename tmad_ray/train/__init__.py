"""Training on Ray Train: the per-worker loop, evaluation, export."""
