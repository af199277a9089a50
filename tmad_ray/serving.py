"""The best student as an MLflow model: ``mlflow.pyfunc.load_model(...).predict(paths)`` classifies videos.

MLflow's transformers flavor has no video-classification task, so the student is logged as a
``pyfunc.PythonModel`` that wraps the exported transformers directory (``student/``: weights,
processor, ``tmad_ray.json`` with the clip sampling) and decodes each video the way evaluation
does: ``eval_clips`` × ``eval_crops`` views, probabilities averaged.

Input: a DataFrame with a ``path`` column (or a list of paths, or one path); paths are read on the
machine that runs the model. Output: one row per video with ``label``, ``score`` (the label's
probability), ``probabilities`` (JSON, label -> probability) and ``error`` (why a video could not be
read; its label is then missing). One bad video never fails the batch.

The model is logged "from code" (``serving_entry.py``): nothing pickled is stored with it. The
package travels with the model (``code_paths``), so loading needs torch, transformers, PyAV and
decord, not an installed ``tmad_ray``.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

MODEL_NAME = "student"  # the MLflow model's name inside the run (models:/m-... and runs:/<run>/student)


class StudentVideoClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of an exported student; see the module docstring for input and output."""

    def load_context(self, context):
        from tmad_ray.train.evaluate import eval_spec
        from tmad_ray.train.export import load_exported

        self.model, sampling = load_exported(context.artifacts["student"])
        self.spec = eval_spec(sampling)
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # pd.DataFrame: the signature (below) validates the input; a list of paths arrives as a one-column frame
        rows = [classify(self.model, self.spec, self.labels, p) for p in video_paths(model_input)]
        return pd.DataFrame(rows, columns=["path", "label", "score", "probabilities", "error"])


def video_paths(model_input) -> list[str]:
    """A DataFrame's ``path`` column (or its only column), a list of paths, or one path."""
    if isinstance(model_input, pd.DataFrame):
        if "path" in model_input.columns:
            return [str(p) for p in model_input["path"]]
        if len(model_input.columns) == 1:
            return [str(p) for p in model_input.iloc[:, 0]]
        raise ValueError(f"expected a DataFrame with a 'path' column, got columns {list(model_input.columns)}")
    if isinstance(model_input, (str, Path)):
        return [str(model_input)]
    return [str(p) for p in model_input]


def classify(model, spec, labels: list[str], path: str) -> dict:
    """One video's label and probabilities (its views averaged, as evaluation does); a row with
    ``error`` if it cannot be read."""
    from tmad_ray.data.clips import BadVideo
    from tmad_ray.train.evaluate import video_probs

    if not Path(path).is_file():
        return {"path": path, "label": None, "score": None, "probabilities": None,
                "error": f"no such file on the serving machine: {path}"}
    try:
        p = video_probs(model, path, spec)
    except BadVideo as e:
        return {"path": path, "label": None, "score": None, "probabilities": None, "error": str(e)}
    i = int(p.argmax())
    return {"path": path, "label": labels[i], "score": float(p[i]),
            "probabilities": json.dumps({lab: round(float(v), 6) for lab, v in zip(labels, p)}), "error": None}


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string", "path"), ColSpec("string", "label", required=False),
                        ColSpec("double", "score", required=False),
                        ColSpec("string", "probabilities", required=False),
                        ColSpec("string", "error", required=False)]))


def requirements() -> list[str]:
    """What loading the model needs, pinned to what trained it."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "transformers", "av", "decord", "numpy", "pandas", "mlflow")]


def log_student(student_dir: str | Path, example_video: str | None):
    """Log ``student_dir`` as a pyfunc model named ``student`` to the active run; returns MLflow's
    ``ModelInfo``. ``example_video``: a path for the input example (MLflow checks it by running the
    model on it), or None."""
    import tmad_ray

    example = pd.DataFrame({"path": [str(example_video)]}) if example_video else None
    return mlflow.pyfunc.log_model(
        name=MODEL_NAME, python_model=str(Path(tmad_ray.__file__).parent / "serving_entry.py"),
        artifacts={"student": str(student_dir)}, code_paths=[str(Path(tmad_ray.__file__).parent)],
        signature=signature(), input_example=example, pip_requirements=requirements())
