"""Distillation: the objective as pure losses (losses), the tri-model around the student (trimodel),
and the frozen models' targets computed once per study (targets)."""
