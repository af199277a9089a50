"""Training on Ray Train: the worker's loop (loop, worker, epoch, metrics), the driver's side (run),
evaluation and export."""
