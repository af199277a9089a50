"""Distillation: pure losses and the tri-model module."""
