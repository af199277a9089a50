"""The search: Optuna define-by-run space and the Tune driver."""
