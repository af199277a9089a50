"""The toy zoo: formats and loading paths (tiny and fast; the README records the full run)."""

import argparse
import json

import numpy as np
import pytest
import torch
from transformers import VideoMAEForVideoClassification

from conftest import smoke_config
from tmad_ray.models import amd
from tmad_ray.models.hf import load_assistant, load_teacher, video_config
from tmad_ray.models.toyzoo import DIRECTIONS, build_zoo, direction_scene, to_amd_state_dict


def test_amd_export_round_trips_through_the_real_conversion():
    torch.manual_seed(0)
    cfg = video_config(depth=2, width=32, heads=2, image_size=32, num_frames=4, patch_size=8, tubelet_size=2,
                       labels=DIRECTIONS)
    model = VideoMAEForVideoClassification(cfg).eval()
    back = amd.build_converted(to_amd_state_dict(model), cfg)
    x = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back(pixel_values=x).logits, model(pixel_values=x).logits, atol=1e-5)


def test_direction_scenes_move_the_whole_cast_the_named_way():
    for direction, axis, sign in [("down", 0, 1), ("up", 0, -1), ("right", 1, 1), ("left", 1, -1)]:
        s = direction_scene(direction, np.random.default_rng(0), 64, 64, 8)
        step = np.diff(np.unwrap(s.particle[:, axis] / 64 * 2 * np.pi)) * 64 / (2 * np.pi)
        # Shift of 1-2 px/frame, minus the particle's own drift of at most 0.6 px/frame.
        assert (np.sign(step) == sign).all() and (np.abs(step) >= 0.4).all()


@pytest.mark.integration
def test_zoo_writes_a_teacher_and_an_amd_assistant_that_the_normal_loaders_load(synth_root, tmp_path):
    cfg = smoke_config(tmp_path, synth_root, "data.synthetic={seed: 0, videos_per_class: 4, size: 32, frames: 16}",
                       f"models.toy_zoo.dir={tmp_path / 'zoo'}",
                       f"models.teacher.name={tmp_path / 'zoo' / 'teacher'}",
                       f"models.assistant.path={tmp_path / 'zoo' / 'assistant.pth'}",
                       f"models.assistant.config={tmp_path / 'zoo' / 'assistant_config.json'}")
    r = build_zoo(cfg, tmp_path / "zoo", seed=0, clips_per_class=4, epochs=1, say=lambda s: None)
    assert json.loads((tmp_path / "zoo" / "zoo.json").read_text()) == r
    assert 0 <= r["teacher"]["val_accuracy"] <= 1 and r["teacher"]["val_clips"] == 4

    teacher = load_teacher(cfg.models.teacher.name)
    assert isinstance(teacher, VideoMAEForVideoClassification)
    assert teacher.config.id2label == {0: "A", 1: "B1", 2: "B2", 3: "G"}  # the dataset's labels: teaches logits
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(tmp_path / "zoo" / "assistant.pth", weights_only=True)
    assert set(raw) == {"model", "args"} and "blocks.0.attn.qkv.weight" in raw["model"]  # AMD's format
    assistant = load_assistant(cfg.models, cfg.data)  # through the real conversion
    assert assistant.config.id2label == dict(enumerate(DIRECTIONS))
    x = torch.randn(1, cfg.data.num_frames, 3, cfg.data.image_size, cfg.data.image_size)
    assert assistant(pixel_values=x).logits.shape == (1, 4)


@pytest.mark.integration
def test_the_zoos_pretrained_student_loads_like_a_hub_student_with_a_new_head(synth_root, tmp_path):
    """The student is a masked autoencoder saved as VideoMAE-base is (``VideoMAEForPreTraining``, no
    classifier); ``models.student.name`` loads its backbone strictly and adds a head for the labels.
    A zoo made before it had a student gets one added, its teacher untouched."""
    from tmad_ray.models.hf import build_student
    from tmad_ray.models.toyzoo import ensure_toy_zoo

    zoo = tmp_path / "zoo"
    cfg = smoke_config(tmp_path, synth_root, "data.synthetic={seed: 0, videos_per_class: 4, size: 32, frames: 16}",
                       f"models.toy_zoo.dir={zoo}", f"models.student={{name: {zoo / 'student'}}}",
                       "models.toy_zoo.student={depth: 2, width: 32, heads: 2, clips: 16, epochs: 3}")
    assert cfg.models.student.name == str(zoo / "student")
    r = build_zoo(cfg, zoo, seed=0, clips_per_class=4, epochs=1, say=lambda s: None)
    loss = r["student"]["reconstruction_loss"]
    assert len(loss) == 3 and loss[-1] < loss[0]  # it learned something from unlabeled clips
    assert json.loads((zoo / "student" / "config.json").read_text())["architectures"] == ["VideoMAEForPreTraining"]

    labels = ["A", "B1", "B2", "G"]
    student = build_student(cfg.models.student, cfg.data, labels)
    assert student.reinitialized == ["classifier", "fc_norm"] and student.config.id2label == dict(enumerate(labels))
    from transformers import VideoMAEForPreTraining

    mae = VideoMAEForPreTraining.from_pretrained(zoo / "student")
    for k, v in mae.videomae.state_dict().items():  # the whole backbone came from the checkpoint
        assert torch.equal(student.videomae.state_dict()[k], v), k
    sized = smoke_config(tmp_path, synth_root)
    assert not hasattr(build_student(sized.models.student, sized.data, labels), "reinitialized")

    # an older zoo without a student: ensure_toy_zoo pretrains just the student
    teacher_bytes = (zoo / "teacher" / "model.safetensors").read_bytes()
    import shutil

    shutil.rmtree(zoo / "student")
    said = []
    ensure_toy_zoo(cfg, say=said.append)
    assert any("has no pretrained student" in s for s in said)
    assert (zoo / "student" / "config.json").is_file()
    assert (zoo / "teacher" / "model.safetensors").read_bytes() == teacher_bytes
    assert "student" in json.loads((zoo / "zoo.json").read_text())
