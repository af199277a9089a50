"""The best student as an MLflow model: ``mlflow.pyfunc.load_model(...).predict(paths)`` classifies videos.

MLflow's transformers flavor has no video-classification task, so the student is logged as a
``pyfunc.PythonModel`` that wraps the exported transformers directory (``student/``: weights,
processor, ``tmad_ray.json`` with the clip sampling) and decodes each video the way evaluation
does: ``eval_clips`` × ``eval_crops`` views, probabilities averaged.

Input: a DataFrame with a ``path`` column (or a list of them, or one). Each is a path, read on the
machine that runs the model, or the video itself as a data URI (``data:video/mp4;base64,...``).
Output: one row per video with ``label``, ``score`` (the label's probability), ``probabilities``
(JSON, label -> probability) and ``error`` (why a video could not be read; its label and score are
then null, never NaN, so the server's JSON stays strict). One bad video never fails the batch.

Served over HTTP (``mlflow models serve``: see ``served``), the
model takes a client's path only under the folders the operator lists in ``TMAD_RAY_SERVE_ROOTS``
(``os.pathsep``-separated); every other path gets the same refusal, whether or not it exists, so a
client learns nothing of the server's files. Videos sent as bytes must be a container we decode
(MP4/MOV, Matroska/WebM, AVI, MPEG-TS/PS: checked by their first bytes, so FFmpeg is never handed a
playlist that names other files), and errors name no path of the server. In a user's own Python
process, ``load_model(...).predict(paths)`` reads any path, as before.

The model is logged "from code" (``serving_entry.py``): nothing pickled is stored with it. The
package travels with the model (``code_paths``), so loading needs torch, transformers, PyAV and
decord, not an installed ``tmad_ray``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

MODEL_NAME = "student"  # the MLflow model's name inside the run (models:/m-... and runs:/<run>/student)
SERVE_ROOTS_ENV = "TMAD_RAY_SERVE_ROOTS"
SERVED_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"  # set by MLflow's scoring server before the first request
MAX_VIDEO_BYTES = 256 * 2**20
REFUSED = ("paths are not read by this server: send the video itself as a data URI "
           "('data:video/mp4;base64,...'), or ask its operator to allow a folder (TMAD_RAY_SERVE_ROOTS)")
_PATHLIKE = re.compile(r"(?:[A-Za-z]:)?[/\\][\w.\-/\\]+")


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
        rows = [classify_input(self.model, self.spec, self.labels, p) for p in video_paths(model_input)]
        out = pd.DataFrame(rows, columns=["path", "label", "score", "probabilities", "error"], dtype=object)
        # object columns keep None: pandas would store a missing label or score as NaN, which the
        # server writes as a bare NaN (JSON has none)
        return out.astype(object).where(out.notna(), None)


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


def served() -> bool:
    """Whether MLflow's scoring server runs this model: its flag, or its app module loaded (so that a
    renamed flag in a later MLflow still leaves paths closed, not open)."""
    import sys

    return os.environ.get(SERVED_ENV, "").lower() == "true" or "mlflow.pyfunc.scoring_server.app" in sys.modules


def classify_input(model, spec, labels: list[str], item: str) -> dict:
    """One input: a data URI, or a path (served: only under ``TMAD_RAY_SERVE_ROOTS``)."""
    if item.startswith("data:"):
        return classify_bytes(model, spec, labels, item)
    if served():
        roots = [os.path.realpath(r) for r in os.environ.get(SERVE_ROOTS_ENV, "").split(os.pathsep) if r.strip()]
        real = os.path.realpath(item)  # symlinks and .. resolved before the check
        if not any(os.path.commonpath([real, r]) == r for r in roots):
            return failed(item, REFUSED)
        row = classify(model, spec, labels, real)
        return {**row, "path": item, "error": public(row["error"]) if row["error"] else None}
    return classify(model, spec, labels, item)


def classify_bytes(model, spec, labels: list[str], uri: str) -> dict:
    """A video sent as ``data:<mime>;base64,<bytes>``: checked, written to a private temporary file,
    classified; its row's ``path`` says what was sent, not where it was written."""
    head, _, payload = uri.partition(",")
    shown = head[:60]
    if not head.endswith(";base64"):
        return failed(shown, "a video sent as a data URI must be base64: data:video/mp4;base64,...")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return failed(shown, "the data URI's payload is not valid base64")
    shown = f"{head} ({len(data)} bytes)"
    if len(data) > MAX_VIDEO_BYTES:
        return failed(shown, f"the video is larger than {MAX_VIDEO_BYTES // 2**20} MiB")
    suffix = container(data)
    if suffix is None:
        return failed(shown, "not a video container this model reads (MP4/MOV, Matroska/WebM, AVI, MPEG-TS/PS)")
    with tempfile.TemporaryDirectory(prefix="tmad-serve-") as d:
        path = os.path.join(d, "video" + suffix)
        with open(path, "wb") as f:
            f.write(data)
        row = classify(model, spec, labels, path)
    return {**row, "path": shown, "error": public(row["error"]) if row["error"] else None}


def container(data: bytes) -> str | None:
    """The file suffix of a video container recognised by its first bytes, else None."""
    if data[4:8] == b"ftyp":
        return ".mp4"
    if data[:4] == b"\x1aE\xdf\xa3":
        return ".mkv"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return ".avi"
    if data[:4] == b"\x00\x00\x01\xba":
        return ".mpg"
    if len(data) >= 377 and data[0] == data[188] == data[376] == 0x47:
        return ".ts"
    return None


def public(error: str) -> str:
    """An error for a client of the server: the decoder's own words (which name files and its build
    paths) replaced by what happened."""
    if error.startswith(("unreadable:", "decode failed")):
        return "the video could not be decoded (corrupt, truncated, or not a supported video)"
    return _PATHLIKE.sub("<path>", error)


def failed(path: str, why: str) -> dict:
    return {"path": path, "label": None, "score": None, "probabilities": None, "error": why}


def classify(model, spec, labels: list[str], path: str) -> dict:
    """One video's label and probabilities (its views averaged, as evaluation does); a row with
    ``error`` if it cannot be read."""
    from tmad_ray.data.clips import BadVideo
    from tmad_ray.train.evaluate import video_probs

    if not Path(path).is_file():
        return failed(path, f"no such file on the serving machine: {path}")
    try:
        p = video_probs(model, path, spec)
    except BadVideo as e:
        return failed(path, str(e))
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
