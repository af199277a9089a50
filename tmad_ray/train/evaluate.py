"""Classification metrics from a confusion matrix, multi-view averaging, and evaluating an exported student.

The confusion matrix is the one thing ranks exchange: it is a sum, so an all-reduce of per-rank
matrices gives the global one, and accuracy, macro-F1 and per-class accuracy follow from it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from tmad_ray.errors import UserError
from tmad_ray.plots import plot_confusion


class EvalError(UserError, ValueError):
    pass


def confusion(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` int64 counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(true, np.int64), np.asarray(pred, np.int64)), 1)
    return cm


def metrics_from_confusion(cm: np.ndarray, labels: list[str]) -> dict:
    """``accuracy``, ``macro_f1`` (mean over classes that occur or are predicted) and ``per_class`` accuracy."""
    cm = np.asarray(cm, np.float64)
    total = cm.sum()
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, tp / support, np.nan)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), np.nan)
    present = ~np.isnan(f1)
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {lab: (None if np.isnan(a) else float(a)) for lab, a in zip(labels, per_class)},
    }


def average_views(video_ids: list[str], probs: np.ndarray, labels: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Average class probabilities ``[V, C]`` over the views of each video -> (videos, ``[N, C]``, ``[N]``)."""
    rows: dict[str, list[int]] = defaultdict(list)
    for i, v in enumerate(video_ids):
        rows[v].append(i)
    videos = sorted(rows)
    mean = np.stack([probs[rows[v]].mean(0) for v in videos]) if videos else np.zeros((0, probs.shape[-1]))
    return videos, mean, np.array([labels[rows[v][0]] for v in videos], np.int64)


@torch.no_grad()
def predict_probs(model: torch.nn.Module, clips: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Softmax probabilities ``[V, C]`` of normalized clips ``[V, T, 3, H, W]``."""
    out = [model(pixel_values=clips[i:i + batch_size]).logits.float().softmax(-1)
           for i in range(0, len(clips), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.config.num_labels)


def eval_spec(sampling: dict, clips: int | None = None, crops: int | None = None):
    """The views an exported student is evaluated on (its ``tmad_ray.json`` sampling; ``clips`` ×
    ``crops`` per video, by default the ones it was trained with)."""
    from tmad_ray.data.clips import ViewSpec

    s = sampling
    return ViewSpec(mode="eval", num_frames=s["num_frames"], sampling=s["sampling"], sampling_rate=s["sampling_rate"],
                    image_size=s["image_size"], train_short_side=s["image_size"], train_views=1,
                    eval_clips=clips or s.get("eval_clips", 1), eval_crops=crops or s.get("eval_crops", 1), seed=0)


def video_probs(model: torch.nn.Module, path: str, spec, batch_size: int = 16) -> torch.Tensor:
    """``[C]`` class probabilities of one video, averaged over its views; raises ``BadVideo``."""
    from tmad_ray.data.clips import decode_views
    from tmad_ray.data.augment import normalize

    with torch.inference_mode():
        return predict_probs(model, normalize(decode_views(path, spec)), batch_size).mean(0)


def evaluate_exported(model_dir: str, root: str, split: str = "test", clips: int | None = None,
                      crops: int | None = None, label_mode: str | None = None, out_dir: str | None = None,
                      batch_size: int = 16) -> dict:
    """Multi-view evaluation of an exported student on ``ROOT``'s ``split`` (probabilities averaged
    over clips × crops per video). Writes ``confusion.png`` and returns the metrics."""
    from tmad_ray.data.clips import BadVideo
    from tmad_ray.data.manifest import load_manifest
    from tmad_ray.train.export import load_exported

    model, s = load_exported(model_dir)
    label_mode = label_mode or s.get("label_mode", "as_is")
    manifest = load_manifest(root, label_mode)
    if split not in manifest.rows:
        raise EvalError(f"{root} has no {split!r} split (it has {sorted(manifest.rows)})")
    label2id = {v: int(k) for k, v in model.config.id2label.items()}
    unknown = sorted({r.label for r in manifest.rows[split]} - set(label2id))
    if unknown:
        raise EvalError(f"labels {unknown} of {root} are not among the model's {sorted(label2id)} "
                        f"(label mode {label_mode!r}; see --label-mode)")
    spec = eval_spec(s, clips, crops)
    clips, crops = spec.eval_clips, spec.eval_crops
    probs, truth, bad, videos = [], [], [], []
    for row in manifest.rows[split]:
        try:
            probs.append(video_probs(model, row.abspath(manifest.root), spec, batch_size).numpy())
        except BadVideo as e:
            bad.append({"path": row.path, "reason": str(e)})
            continue
        truth.append(label2id[row.label])
        videos.append(row.path)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if not probs:
        raise EvalError(f"no video of {root}/{split} could be decoded ({len(bad)} bad)")
    p, y = np.stack(probs), np.array(truth)
    cm = confusion(y, p.argmax(1), len(labels))
    m = metrics_from_confusion(cm, labels)
    out = Path(out_dir or Path(model_dir) / f"eval_{split}")
    out.mkdir(parents=True, exist_ok=True)
    png = plot_confusion(cm, labels, str(out / "confusion.png"), title=f"{Path(model_dir).name}: {split}")
    return {"model": str(model_dir), "root": str(root), "split": split, "views": f"{clips}x{crops}",
            "videos": len(y), "bad": bad, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "per_class": m["per_class"], "confusion": cm.tolist(), "labels": labels, "confusion_png": png}
