"""Models: teacher and student from transformers (hf), the AMD assistant (amd), the toy zoo (toyzoo)."""
