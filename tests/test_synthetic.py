"""The embedded dataset: layout, determinism, and a label that only motion reveals."""

import hashlib
from collections import Counter

import av
import numpy as np
import pytest

from tmad_ray.data.manifest import load_manifest
from tmad_ray.data.synthetic import CLASSES, make_dataset


def digest(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_determinism(tmp_path, synth_root):
    m = load_manifest(synth_root)
    assert m.labels == sorted(CLASSES) and not m.problems and not m.val_from_train
    assert {s: Counter(r.label for r in rows) for s, rows in m.rows.items()} == {
        "train": {c: 2 for c in CLASSES}, "val": {c: 1 for c in CLASSES}, "test": {c: 1 for c in CLASSES}}
    again = tmp_path / "again"
    make_dataset(again, seed=0, videos_per_class=4, size=32, frames=16)
    assert digest(again) == digest(synth_root)  # byte-identical from the seed
    other = tmp_path / "other"
    make_dataset(other, seed=1, videos_per_class=4, size=32, frames=16)
    assert digest(other) != digest(synth_root)


def test_per_split_counts_give_few_labeled_and_many_held_out_videos(tmp_path):
    root = tmp_path / "q"
    params = make_dataset(root, seed=0, size=32, frames=8, per_split={"train": 2, "val": 3, "test": 4})
    m = load_manifest(root)
    assert {k: len(v) for k, v in m.rows.items()} == {"train": 8, "val": 12, "test": 16}
    assert all(Counter(r.label for r in m.rows[split]) == Counter({c: n for c in CLASSES})
               for split, n in (("train", 2), ("val", 3), ("test", 4)))
    assert params["per_split"] == {"train": 2, "val": 3, "test": 4} and params["videos_per_class"] == 9
    with pytest.raises(ValueError, match="per_split"):
        make_dataset(tmp_path / "bad", per_split={"train": 2, "val": 0, "test": 1})


def test_existing_dataset_is_kept_and_a_different_one_refused(synth_root, tmp_path):
    before = digest(synth_root)
    make_dataset(synth_root, seed=0, videos_per_class=4, size=32, frames=16)  # same params: no-op
    assert digest(synth_root) == before
    with pytest.raises(FileExistsError, match="different synthetic dataset"):
        make_dataset(synth_root, seed=5, videos_per_class=4, size=32, frames=16)


def _decode_gray(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="gray") for f in c.decode(video=0)]).astype(np.float32)


def _nearest_centroid_accuracy(x_train, y_train, x_test, y_test):
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    z_train, z_test = (x_train - mu) / sd, (x_test - mu) / sd
    centroids = np.stack([z_train[y_train == c].mean(0) for c in range(len(CLASSES))])
    pred = ((z_test[:, None] - centroids) ** 2).sum(-1).argmin(1)
    return float((pred == y_test).mean())


def _frame_features(video):
    frame = video[len(video) // 2]
    hist = np.histogram(frame, bins=32, range=(0, 255))[0]
    return np.concatenate([frame[::4, ::4].ravel(), hist])


def _motion_features(video):
    diff = np.abs(np.diff(video, axis=0))
    hist = np.log1p(np.histogram(diff, bins=24, range=(0, 120))[0])
    moving = np.sort((diff > 25).mean((1, 2)))  # fraction of moving pixels per step, sorted
    return np.concatenate([hist, moving])


def test_single_frames_do_not_give_the_label_away_but_motion_does(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, seed=3, videos_per_class=30, size=64, frames=32)
    m = load_manifest(root)
    label2id = m.label2id
    train = m.rows["train"] + m.rows["val"]
    test = m.rows["test"]

    def features(rows, fn):
        return np.stack([fn(_decode_gray(r.abspath(m.root))) for r in rows]), np.array([label2id[r.label] for r in rows])

    xf, yf = features(train, _frame_features)
    tf, ytf = features(test, _frame_features)
    xm, ym = features(train, _motion_features)
    tm, ytm = features(test, _motion_features)
    frame_acc = _nearest_centroid_accuracy(xf, yf, tf, ytf)
    motion_acc = _nearest_centroid_accuracy(xm, ym, tm, ytm)
    chance = 1 / len(CLASSES)
    assert frame_acc <= chance + 0.15, f"single frames reveal the label: {frame_acc:.2f}"
    assert motion_acc >= chance + 0.3, f"motion does not reveal the label: {motion_acc:.2f}"
