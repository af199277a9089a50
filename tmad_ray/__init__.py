"""tmad_ray: tri-model asymmetric distillation of video classifiers on Ray Train/Tune + Optuna + MLflow."""

__version__ = "0.1.0"
