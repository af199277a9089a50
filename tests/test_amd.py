"""AMD -> transformers conversion, checked against an independent implementation of AMD's ViT."""

import argparse
import subprocess
import sys

import pytest
import torch
from transformers import VideoMAEConfig, VideoMAEForVideoClassification, VideoMAEModel

from amd_reference import AmdViT, save_amd
from tmad_ray.models import amd

TINY = dict(dim=48, depth=3, heads=4, num_classes=5, image=32, patch=8, frames=4, tubelet=2)


def tiny_config(heads=4, pretrain=False, num_labels=5):
    return VideoMAEConfig(image_size=32, patch_size=8, num_channels=3, num_frames=4, tubelet_size=2, hidden_size=48,
                          num_hidden_layers=3, num_attention_heads=heads, intermediate_size=192, hidden_act="gelu",
                          qv_bias=True, layer_norm_eps=1e-6, use_mean_pooling=not pretrain, num_labels=num_labels)


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return AmdViT(**TINY).eval()


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(1)
    return torch.randn(2, 3, 4, 32, 32)  # B, C, T, H, W (AMD layout)


def ours(model, clip):
    with torch.no_grad():
        out = model(pixel_values=clip.permute(0, 2, 1, 3, 4))  # transformers takes B, T, C, H, W
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("fmt, prefix", [("module", ""), ("model", ""), ("module", "module."), ("model", "backbone.")])
def test_converted_logits_equal_the_reference(tmp_path, ref, clip, fmt, prefix):
    path = tmp_path / "ckpt.pth"
    save_amd(ref, path, fmt=fmt, prefix=prefix)
    sd, args = amd.load_amd_file(path)
    assert (args is None) == (fmt == "module")
    model = amd.build_converted(sd, tiny_config())
    with torch.no_grad():
        expected = ref(clip)
    assert (ours(model, clip) - expected).abs().max().item() <= 1e-4


def test_fp16_checkpoints_convert_to_fp32(tmp_path, ref, clip):
    save_amd(ref, tmp_path / "half.pth", half=True)
    sd, _ = amd.load_amd_file(tmp_path / "half.pth")
    assert all(v.dtype == torch.float16 for v in sd.values())
    model = amd.build_converted(sd, tiny_config())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    rounded = AmdViT(**TINY).eval()  # the reference with the same fp16-rounded weights
    rounded.load_state_dict({k: v.float() for k, v in sd.items()})
    with torch.no_grad():
        assert (ours(model, clip) - rounded(clip)).abs().max().item() <= 1e-4


def test_pretraining_encoder_converts_to_videomae_model(tmp_path, clip):
    torch.manual_seed(2)
    enc = AmdViT(**{**TINY, "num_classes": 0}).eval()
    sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    sd["encoder.projection_heads.0.weight"] = torch.zeros(4, 48)  # AMD's distillation projectors are dropped
    sd["decoder.blocks.0.norm1.weight"] = torch.ones(8)
    sd["mask_token"] = torch.zeros(1, 1, 8)
    with pytest.raises(amd.ConversionError, match="drop_decoder"):
        amd.convert_state_dict(sd, tiny_config(pretrain=True), pretrain=True)
    model = amd.build_converted(sd, tiny_config(pretrain=True), pretrain=True, drop_decoder=True)
    assert isinstance(model, VideoMAEModel)
    with torch.no_grad():
        assert (ours(model, clip) - enc(clip)).abs().max().item() <= 1e-4


def test_negative_control_wrong_head_count(ref, clip):
    # Weights fit any head count that divides the width: only the architecture knows the right one.
    model = amd.build_converted(ref.state_dict(), tiny_config(heads=2))
    with torch.no_grad():
        assert (ours(model, clip) - ref(clip)).abs().max().item() > 1e-2


def test_negative_control_dropped_qv_bias(ref, clip):
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith(("q_bias", "v_bias"))}
    with pytest.raises(amd.ConversionError, match="missing 6.*query.bias"):
        amd.build_converted(sd, tiny_config())
    # And if a converter zeroed them instead, the logits would be wrong: the biases matter.
    zeroed = {k: (torch.zeros_like(v) if k.endswith(("q_bias", "v_bias")) else v) for k, v in ref.state_dict().items()}
    with torch.no_grad():
        assert (ours(amd.build_converted(zeroed, tiny_config()), clip) - ref(clip)).abs().max().item() > 1e-3


def test_negative_control_matching_keys_by_name(ref, clip):
    """The reference framework's loader: load_state_dict(strict=False) with AMD's names."""
    model = VideoMAEForVideoClassification(tiny_config()).eval()
    result = model.load_state_dict(ref.state_dict(), strict=False)
    loaded = set(ref.state_dict()) - set(result.unexpected_keys)
    assert loaded == {"fc_norm.weight", "fc_norm.bias"}  # the only names that happen to match
    with torch.no_grad():
        assert (ours(model, clip) - ref(clip)).abs().max().item() > 1e-2


def test_unknown_missing_and_misshaped_keys_are_listed(ref):
    sd = dict(ref.state_dict())
    sd["blocks.0.gamma_1"] = torch.ones(48)  # layer scale: no rule
    with pytest.raises(amd.ConversionError, match=r"no rule: \['blocks.0.gamma_1'\]"):
        amd.convert_state_dict(sd, tiny_config())
    sd = dict(ref.state_dict())
    sd["head.weight"] = torch.zeros(7, 48)
    sd["head.bias"] = torch.zeros(7)
    with pytest.raises(amd.ConversionError, match=r"shape mismatch 2: \['classifier.bias: checkpoint \(7,\)"):
        amd.build_converted(sd, tiny_config())
    sd = dict(ref.state_dict())
    del sd["blocks.2.mlp.fc2.weight"]
    with pytest.raises(amd.ConversionError, match="missing 1: .*layer.2.output.dense.weight"):
        amd.build_converted(sd, tiny_config())


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickles_are_refused(tmp_path, ref):
    torch.save({"model": ref.state_dict(), "args": argparse.Namespace(a=1)}, tmp_path / "ok.pth")
    amd.load_amd_file(tmp_path / "ok.pth")
    torch.save({"model": ref.state_dict(), "hook": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(amd.ConversionError, match="weights_only"):
        amd.load_amd_file(tmp_path / "evil.pth")


def test_real_architectures_have_the_real_head_counts():
    s, b = amd.amd_config("vit-s", 174), amd.amd_config("vit-b", 174)
    assert (s.hidden_size, s.num_attention_heads, s.num_hidden_layers) == (384, 6, 12)
    assert (b.hidden_size, b.num_attention_heads, b.num_hidden_layers) == (768, 12, 12)
    assert s.layer_norm_eps == 1e-6 and s.use_mean_pooling and s.qv_bias
    assert amd.zoo_entry("vit-s", "ssv2").file_id == "1ynDyu3K_INoZjaNLzFIaYCo6kjBOwG__"
    with pytest.raises(KeyError, match="known"):
        amd.zoo_entry("vit-l", "ssv2")


def test_convert_amd_cli_round_trip(tmp_path, ref, clip):
    ckpt, out = tmp_path / "ckpt.pth", tmp_path / "hf"
    save_amd(ref, ckpt, fmt="model", half=False)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(tiny_config().to_json_string())
    r = subprocess.run([sys.executable, "-m", "tmad_ray", "convert-amd", str(ckpt), str(out), "--config", str(cfg_json)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model = VideoMAEForVideoClassification.from_pretrained(out).eval()
    with torch.no_grad():
        assert (ours(model, clip) - ref(clip)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("prefix", ["", "module.", "backbone."])
def test_label_count_is_read_from_the_head_whatever_the_prefix(prefix):
    sd = {f"{prefix}head.weight": torch.zeros(174, 384), f"{prefix}head.bias": torch.zeros(174)}
    config = amd.target_config(sd, arch="vit-s")
    assert (config.num_labels, config.num_attention_heads, config.hidden_size) == (174, 6, 384)
