"""Teacher / student / assistant loading and the shared-tokenization check."""

import pytest
import torch
from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification, VideoMAEModel

from amd_reference import AmdViT, save_amd
from tmad_ray.config import config_from_dict
from tmad_ray.models.hf import (ModelError, build_student, check_tokenization, load_assistant, load_teacher,
                                video_config)

LABELS = ["A", "B1", "B2", "G"]


def data_cfg(**kw):
    return config_from_dict({"data": {"image_size": 32, "num_frames": 4, **kw}}).data


def tiny(labels=LABELS, **kw):
    return video_config(**{"depth": 2, "width": 32, "heads": 2, "image_size": 32, "num_frames": 4, "patch_size": 8,
                           "tubelet_size": 2, "labels": labels, **kw})


def test_teacher_with_a_classifier_teaches_logits(tmp_path):
    VideoMAEForVideoClassification(tiny()).save_pretrained(tmp_path / "t")
    teacher = load_teacher(str(tmp_path / "t"))
    assert isinstance(teacher, VideoMAEForVideoClassification) and not teacher.training
    assert teacher.config.id2label == {0: "A", 1: "B1", 2: "B2", 3: "G"}


def test_self_supervised_teacher_loads_as_encoder(tmp_path):
    """Like MCG-NJU/videomae-base: a pretraining checkpoint (encoder + decoder), no classifier."""
    cfg = VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, decoder_hidden_size=16,
                         decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32,
                         use_mean_pooling=False)
    pre = VideoMAEForPreTraining(cfg)
    pre.save_pretrained(tmp_path / "ssl")
    teacher = load_teacher(str(tmp_path / "ssl"))
    assert isinstance(teacher, VideoMAEModel)
    w = teacher.encoder.layer[1].attention.attention.query.weight
    assert torch.equal(w, pre.videomae.encoder.layer[1].attention.attention.query.weight)  # real weights


def test_unresolvable_models_say_how_to_provide_them(tmp_path):
    # HF_HUB_OFFLINE=1 (conftest): as on a machine without internet, minus the network time-outs.
    with pytest.raises(ModelError, match="(?s)no-such-org/videomae.*save_pretrained.*hf download"):
        load_teacher("no-such-org/videomae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="without config.json"):
        load_teacher(str(tmp_path / "empty"))
    cfg = config_from_dict({"models": {"student": {"name": "no-such-org/student"}}})
    with pytest.raises(ModelError, match="no-such-org/student"):
        build_student(cfg.models.student, data_cfg(), LABELS)


def test_student_from_preset_explicit_and_pretrained(tmp_path):
    cfg = config_from_dict({"models": {"student": {"size": "vit-s"}}, "data": {"image_size": 224, "num_frames": 16}})
    s = build_student(cfg.models.student, cfg.data, LABELS)
    assert (s.config.hidden_size, s.config.num_attention_heads, s.config.num_hidden_layers) == (384, 6, 12)
    assert s.classifier.out_features == 4 and s.config.label2id == {"A": 0, "B1": 1, "B2": 2, "G": 3}

    cfg = config_from_dict({"models": {"student": {"depth": 2, "width": 32, "heads": 2, "patch_size": 8}},
                            "data": {"image_size": 32, "num_frames": 4}})
    s = build_student(cfg.models.student, cfg.data, LABELS)
    assert (s.config.hidden_size, s.config.num_hidden_layers, s.config.patch_size) == (32, 2, 8)

    # A pretrained student keeps its backbone and gets a classifier for the dataset's labels.
    base = VideoMAEForVideoClassification(tiny(labels=[str(i) for i in range(7)]))
    base.save_pretrained(tmp_path / "s")
    cfg = config_from_dict({"models": {"student": {"name": str(tmp_path / "s")}}})
    s = build_student(cfg.models.student, data_cfg(), LABELS)
    assert s.classifier.out_features == 4
    assert torch.equal(s.videomae.encoder.layer[0].output.dense.weight, base.videomae.encoder.layer[0].output.dense.weight)


def test_assistant_from_a_local_amd_checkpoint(tmp_path):
    torch.manual_seed(0)
    ref = AmdViT(dim=32, depth=2, heads=2, num_classes=3, image=32, patch=8, frames=4, tubelet=2).eval()
    save_amd(ref, tmp_path / "a.pth", half=True)
    cfg_json = tmp_path / "a.json"
    cfg_json.write_text(tiny(labels=["l", "r", "u"]).to_json_string())
    cfg = config_from_dict({"models": {"assistant": {"arch": None, "path": str(tmp_path / "a.pth"),
                                                     "config": str(cfg_json)}}})
    assistant = load_assistant(cfg.models, data_cfg())
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert (assistant(pixel_values=x.permute(0, 2, 1, 3, 4)).logits - ref.half().float()(x)).abs().max() < 1e-3
    missing = config_from_dict({"models": {"assistant": {"path": str(tmp_path / "nope.pth")}}})
    with pytest.raises(ModelError, match="fetch-assistant"):
        load_assistant(missing.models, data_cfg())


def test_tokenization_mismatch_is_an_error_naming_model_and_field():
    ok = {"teacher": VideoMAEForVideoClassification(tiny()), "student": VideoMAEForVideoClassification(tiny())}
    check_tokenization(ok, data_cfg())
    bad = {**ok, "assistant": VideoMAEForVideoClassification(tiny(patch_size=16, tubelet_size=1))}
    with pytest.raises(ModelError) as e:
        check_tokenization(bad, data_cfg())
    assert "assistant: patch_size=16 but teacher has 8" in str(e.value)
    assert "assistant: tubelet_size=1 but teacher has 2" in str(e.value)
    with pytest.raises(ModelError, match="teacher: num_frames=4 but data.num_frames=16"):
        check_tokenization(ok, data_cfg(num_frames=16))
