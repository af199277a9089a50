"""The search: the define-by-run space (space), one trial (trial), the study's driver (driver), its
results (results) and its MLflow bookkeeping (mlflow_runs)."""
