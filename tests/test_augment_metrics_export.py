"""Training pieces without Ray: metrics, view averaging, augmentation, schedule, export."""

import math

import numpy as np
import pytest
import torch
from transformers import VideoMAEForVideoClassification, pipeline

from tmad_ray.config import config_from_dict
from tmad_ray.data.synthetic import write_mp4
from tmad_ray.models.hf import video_config
from tmad_ray.train import evaluate as ev
from tmad_ray.train.export import export_student, load_exported
from tmad_ray.data.augment import augment
from tmad_ray.train.worker import cosine_with_warmup

LABELS = ["A", "B1", "B2", "G"]


def test_metrics_from_confusion_by_hand():
    true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    pred = [0, 0, 1, 1, 0, 2, 2, 2, 0]
    cm = ev.confusion(true, pred, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [1, 1, 0, 0], [1, 0, 3, 0], [0, 0, 0, 0]]
    m = ev.metrics_from_confusion(cm, LABELS)
    assert m["accuracy"] == pytest.approx(6 / 9)
    # F1: class 0: 2*2/(3+4)=4/7, class 1: 2*1/(2+2)=1/2, class 2: 2*3/(4+3)=6/7; class 3 absent
    assert m["macro_f1"] == pytest.approx((4 / 7 + 1 / 2 + 6 / 7) / 3)
    assert m["per_class"] == {"A": pytest.approx(2 / 3), "B1": 0.5, "B2": 0.75, "G": None}


def test_views_are_averaged_per_video():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    videos, p, y = ev.average_views(["b", "a", "b", "a"], probs, np.array([1, 0, 1, 0]))
    assert videos == ["a", "b"]
    np.testing.assert_allclose(p, [[0.25, 0.75], [0.75, 0.25]])
    assert y.tolist() == [0, 1]


def test_augment_crops_flips_and_normalizes():
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (6, 4, 10, 10, 3), dtype=torch.uint8)
    out = augment(clips, 8, flip=True, gen=g)
    assert out.shape == (6, 4, 3, 8, 8) and out.dtype == torch.float32
    # every output is some 8x8 window of its clip, possibly mirrored
    from tmad_ray.data.augment import normalize
    for c, o in zip(clips, out):
        windows = [normalize(c[None, :, y:y + 8, x:x + 8])[0] for y in range(3) for x in range(3)]
        assert any(torch.allclose(o, w) or torch.allclose(o, w.flip(-1)) for w in windows)
    no_flip = augment(clips[:, :, 1:9, 1:9], 8, flip=False, gen=g)  # no room to crop, no flip: plain normalize
    torch.testing.assert_close(no_flip, normalize(clips[:, :, 1:9, 1:9]))


def test_cosine_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=2, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[3] == pytest.approx(0.5 * (1 + math.cos(math.pi / 8)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_export_loads_in_the_transformers_pipeline_and_in_eval(tmp_path):
    torch.manual_seed(0)
    data = config_from_dict({"data": {"image_size": 32, "num_frames": 8, "sampling_rate": 2}}).data
    student = VideoMAEForVideoClassification(video_config(2, 32, 2, image_size=32, num_frames=8, patch_size=8,
                                                          tubelet_size=2, labels=LABELS))
    out = export_student(student, data, tmp_path / "student")
    video = tmp_path / "v.mp4"
    write_mp4(video, np.random.default_rng(0).integers(0, 255, (20, 40, 48, 3), dtype=np.uint8))
    clf = pipeline("video-classification", model=str(out))
    pred = clf(str(video), frame_sampling_rate=2)
    assert {p["label"] for p in pred} == set(LABELS) and sum(p["score"] for p in pred) == pytest.approx(1, abs=1e-4)
    assert list(clf.image_processor.image_mean) == [0.485, 0.456, 0.406]  # ImageNet, not the 0.5 default
    # the exported processor turns frames into what training fed the student (our normalize)
    from tmad_ray.data.augment import normalize
    frames = np.random.default_rng(1).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    pixels = clf.image_processor(list(frames), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, normalize(frames[None]), atol=2e-2, rtol=0)
    model, sampling = load_exported(out)
    assert sampling["num_frames"] == 8 and sampling["sampling_rate"] == 2
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=torch.ones(1, 8, 3, 32, 32)).logits,
                                   student.eval()(pixel_values=torch.ones(1, 8, 3, 32, 32)).logits)


def test_load_exported_refuses_a_directory_that_is_not_an_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an exported student"):
        load_exported(tmp_path)


def test_a_process_knows_when_it_was_started():
    import subprocess
    import sys

    code = ("import time; t = time.time(); from tmad_ray.train.metrics import process_started_at; "
            "print(t - process_started_at())")
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert -1.5 <= age < 30  # the interpreter's start, within Linux's one-second boot time
