"""The trained student as a transformers directory that ``pipeline("video-classification")`` loads.

``save_pretrained`` of the student (its id2label is the dataset's), a ``VideoMAEImageProcessor``
with the training normalization (ImageNet mean/std: the processor's default is 0.5), resize to
the training size and centre crop, and ``tmad_ray.json`` with how clips were sampled.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import VideoMAEForVideoClassification, VideoMAEImageProcessor

from tmad_ray.data.augment import IMAGENET_MEAN, IMAGENET_STD
from tmad_ray.errors import NotFound

SAMPLING_FILE = "tmad_ray.json"


def processor_for(image_size: int) -> VideoMAEImageProcessor:
    return VideoMAEImageProcessor(
        do_resize=True, size={"shortest_edge": image_size}, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def export_student(student: VideoMAEForVideoClassification, data_cfg, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write the student, its processor and the sampling it was trained with to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    processor_for(data_cfg.image_size).save_pretrained(out)
    sampling = {"num_frames": data_cfg.num_frames, "sampling": data_cfg.sampling,
                "sampling_rate": data_cfg.sampling_rate, "image_size": data_cfg.image_size,
                "label_mode": data_cfg.label_mode, "eval_clips": data_cfg.eval_clips, "eval_crops": data_cfg.eval_crops,
                "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}, **(extra or {})}
    (out / SAMPLING_FILE).write_text(json.dumps(sampling, indent=1))
    return out


def load_exported(path: str | Path) -> tuple[VideoMAEForVideoClassification, dict]:
    """The exported student (eval mode) and its sampling record; a clear error if it is not an export."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise NotFound(f"{p} is not an exported student (no config.json); export one with `tmad-ray train`")
    if not (p / SAMPLING_FILE).is_file():
        raise NotFound(f"{p} has no {SAMPLING_FILE}: how its clips were sampled is unknown; "
                       "export the student with `tmad-ray train` (or write that file)")
    model = VideoMAEForVideoClassification.from_pretrained(p).eval()
    return model, json.loads((p / SAMPLING_FILE).read_text())

