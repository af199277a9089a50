"""The file MLflow runs to build the logged student model ("models from code": no pickled object
is stored with the model, so loading it executes only this package's code)."""

from mlflow.models import set_model

from tmad_ray.serving import StudentVideoClassifier

set_model(StudentVideoClassifier())
