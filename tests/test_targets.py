"""The frozen-target cache gives the same losses as running the frozen models, on the same views."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from test_trimodel import LABELS, models
from tmad_ray.config import config_from_dict
from tmad_ray.data.cache import ClipCache
from tmad_ray.distill.targets import (TargetCache, TargetReader, aug_params, build_target_cache, crop_flip,
                                      plan)
from tmad_ray.distill.trimodel import TriModel


def setup(tmp_path, **distill):
    cfg = config_from_dict({
        "data": {"image_size": 32, "num_frames": 4, "train_short_side": 40, "train_views": 2},
        "distill": {"align_layers": [-1], "attn_query_tokens": 6, "target_views": 2, **distill},
        "search": {"align_layer_sets": ["-1", "-1,-2"]},
        "storage": {"clip_cache": str(tmp_path / "clips")},
    })
    rng = np.random.default_rng(0)
    cache, entries = ClipCache(cfg.storage.clip_cache), {}
    for i in range(3):
        vid, key = f"videos/v{i}.mp4", f"{i:02d}" + "ab" * 8
        cache.write_clips(key, vid, rng.integers(0, 255, (2, 4, 40, 40, 3), dtype=np.uint8))
        entries[vid] = key
    return cfg, SimpleNamespace(entries={"train": entries}), cache


@pytest.mark.parametrize("layers", [[-1], [-1, -2]])
def test_cached_targets_give_the_live_losses(tmp_path, layers):
    cfg, report, cache = setup(tmp_path)
    student, teacher, assistant = models()
    stats = build_target_cache(cfg, report, {"teacher": teacher, "assistant": assistant}, 2, LABELS, log=lambda *a: None)
    assert stats["computed"] == 3 and stats["views"] == 3 * 2 * 2 and stats["bytes"] > 0

    trial_cfg = cfg.model_copy(deep=True)
    trial_cfg.distill.align_layers = layers
    tri = TriModel(student, teacher, assistant, trial_cfg.distill, LABELS).eval()
    reader = TargetReader(TargetCache(cfg.storage.clip_cache, stats["key"]), report.entries["train"], K=2)
    vids = ["videos/v0.mp4", "videos/v1.mp4", "videos/v2.mp4", "videos/v1.mp4"]
    views = [0, 1, 1, 0]
    params, query, cached = reader.batch(vids, views, torch.Generator().manual_seed(0), "cpu")
    clips = torch.stack([torch.from_numpy(cache.read_clips(report.entries["train"][v])[1][w]) for v, w in zip(vids, views)])
    x = crop_flip(clips, params, 32)
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        live = tri(x, y, query_idx=query)
        calls = {"n": 0}
        for m in (teacher, assistant):
            m.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
        from_cache = tri(x, y, cached=cached, query_idx=query)
    assert calls["n"] == 0  # the frozen models did not run
    assert query.shape == (4, 6)
    for k in ("ce", "feat", "attn", "asym", "asym_spatial", "asym_temporal", "kd_teacher", "loss"):
        assert from_cache[k].item() == pytest.approx(live[k].item(), rel=2e-2, abs=2e-3), k


def test_augmentations_are_fixed_per_view_and_the_key_follows_the_weights(tmp_path):
    cfg, report, _ = setup(tmp_path)
    a = aug_params("v", 0, 1, 40, 32, True)
    assert a == aug_params("v", 0, 1, 40, 32, True) and 0 <= a[0] <= 8 and 0 <= a[1] <= 8
    assert len({aug_params("v", 0, k, 40, 32, True) for k in range(8)}) > 1
    assert not any(aug_params("v", 0, k, 40, 32, False)[2] for k in range(8))
    _, teacher, assistant = models()
    first = plan(cfg, 2, {"teacher": teacher, "assistant": assistant}, LABELS)
    assert first["models"]["teacher"]["layers"] == [2, 4] and first["models"]["assistant"]["layers"] == [2, 3]
    with torch.no_grad():
        teacher.classifier.bias.add_(1.0)
    assert plan(cfg, 2, {"teacher": teacher, "assistant": assistant}, LABELS)["key"] != first["key"]
    stats = build_target_cache(cfg, report, {"teacher": teacher}, 2, LABELS, log=lambda *a: None)
    again = build_target_cache(cfg, report, {"teacher": teacher}, 2, LABELS, log=lambda *a: None)
    assert (stats["computed"], again["computed"], again["reused"]) == (3, 0, 3)
