"""The frozen-target cache gives the same losses as running the frozen models, on the same views."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from test_trimodel import LABELS, models
from tmad_ray.config import config_from_dict
from tmad_ray.data.cache import ClipCache
from tmad_ray.data.augment import aug_params, crop_flip
from tmad_ray.distill.targets import TargetCache, TargetCacheError, TargetReader, build_target_cache, plan
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


def sharp_models():
    """The test models with their frozen models' attention sharpened: random-init attention is almost
    uniform (every map ~1/N), and near-uniform maps would let wrong maps pass any comparison."""
    student, teacher, assistant = models()
    with torch.no_grad():
        for m in (teacher, assistant):
            for block in m.videomae.encoder.layer:
                block.attention.attention.query.weight.mul_(6.0)
                block.attention.attention.key.weight.mul_(6.0)
    return student, teacher, assistant


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference relative to the largest value (fp16 storage keeps this near 1e-3)."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize("layers", [[-1], [-1, -2]])
def test_cached_targets_equal_the_live_ones(tmp_path, layers):
    cfg, report, cache = setup(tmp_path)
    student, teacher, assistant = sharp_models()
    frozen = {"teacher": teacher, "assistant": assistant}
    stats = build_target_cache(cfg, report, frozen, 2, LABELS, say=lambda *a: None)
    assert stats["computed"] == 3 and stats["views"] == 3 * 2 * 2 and stats["bytes"] > 0

    trial_cfg = cfg.model_copy(deep=True)
    trial_cfg.distill.align_layers = layers
    tri = TriModel(student, teacher, assistant, trial_cfg.distill, LABELS).eval()
    reader = TargetReader(TargetCache(cfg.storage.clip_cache, stats["key"]), report.entries["train"], K=2,
                          keep=tri.target_layers())
    vids = ["videos/v0.mp4", "videos/v1.mp4", "videos/v2.mp4", "videos/v1.mp4"]
    views = [0, 1, 1, 0]
    params, query, cached = reader.batch(vids, views, torch.Generator().manual_seed(0), "cpu")
    clips = torch.stack([torch.from_numpy(cache.read_clips(report.entries["train"][v])[1][w]) for v, w in zip(vids, views)])
    x = crop_flip(clips, params, 32)
    assert query.shape == (4, 6)

    # the targets themselves, model by model and layer by layer
    checked = 0
    for name, f in tri.frozen.items():
        live = f.targets(x, query)
        live["grid"] = tri._grid(live.pop("tokens"))
        got = f.select(cached[name])
        for key in ("feats", "attn"):
            for g, w in zip(got[key], live[key]):
                assert g.shape == w.shape and rel_err(g, w) < 5e-3, (name, key)
                checked += 1
        assert rel_err(got["grid"], live["grid"]) < 5e-3
        if f.teaches_logits:
            assert rel_err(got["logits"], live["logits"]) < 5e-3
        # the control: wrong maps (uniform rows) are far outside that tolerance, so the check can fail
        uniform = torch.full_like(live["attn"][0], 1 / live["attn"][0].shape[-1])
        assert rel_err(uniform, live["attn"][0]) > 0.3
    assert checked == 2 * 2 * len(layers)

    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        live = tri(x, y, query_idx=query)
        calls = {"n": 0}
        for m in (teacher, assistant):
            m.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
        from_cache = tri(x, y, cached=cached, query_idx=query)
    assert calls["n"] == 0  # the frozen models did not run
    for k in ("ce", "feat", "attn", "asym", "asym_spatial", "asym_temporal", "kd_teacher", "loss"):
        assert from_cache[k].item() == pytest.approx(live[k].item(), rel=2e-2), k


def test_the_size_is_known_before_building_and_a_cache_too_large_is_refused(tmp_path):
    cfg, report, _ = setup(tmp_path)
    _, teacher, assistant = models()
    frozen = {"teacher": teacher, "assistant": assistant}
    said = []
    stats = build_target_cache(cfg, report, frozen, 2, LABELS, say=said.append)
    # the estimate is the tensors' bytes; the files add torch.save's framing (a few KB per entry)
    assert stats["estimated_bytes"] <= stats["bytes"] <= stats["estimated_bytes"] + 3 * 64 * 1024
    assert f"{stats['estimated_bytes'] / 1e9:.2f} GB" in said[0]
    small = cfg.model_copy(deep=True)
    small.distill.target_cache_max_gb = stats["estimated_bytes"] / 4 / 1e9
    small.distill.target_views = 1  # a new key (half the size): nothing computed yet, and nothing may be
    with pytest.raises(TargetCacheError, match="distill.target_cache_max_gb"):
        build_target_cache(small, report, frozen, 2, LABELS, say=lambda *a: None)
    assert ClipCache(cfg.storage.clip_cache).size_bytes("targets") == stats["bytes"]  # no entry of the new key


def test_the_reader_keeps_the_trials_layers_within_its_memory_budget(tmp_path):
    cfg, report, _ = setup(tmp_path)
    _, teacher, assistant = models()
    stats = build_target_cache(cfg, report, {"teacher": teacher, "assistant": assistant}, 2, LABELS,
                               say=lambda *a: None)
    store = TargetCache(cfg.storage.clip_cache, stats["key"])
    full = TargetReader(store, report.entries["train"], K=2)
    entry = full._entry("videos/v0.mp4")
    assert set(entry["teacher"]["feats"]) == {2, 4}  # every candidate layer
    keep = {"teacher": {4}, "assistant": {3}}
    lean = TargetReader(store, report.entries["train"], K=2, keep=keep, budget_mb=1.5 * entry["nbytes"] / 2**20 / 2)
    one = lean._entry("videos/v0.mp4")
    assert set(one["teacher"]["feats"]) == {4} and set(one["assistant"]["attn"]) == {3}
    assert one["nbytes"] < entry["nbytes"]
    g = torch.Generator().manual_seed(0)
    for vid in ["videos/v0.mp4", "videos/v1.mp4", "videos/v2.mp4"] * 3:
        lean.batch([vid], [0], g, "cpu")
        assert lean.bytes <= lean.budget or len(lean.loaded) == 1
    assert len(lean.loaded) < 3 and lean.reads > 3  # evicted and read again: memory stays bounded


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
    stats = build_target_cache(cfg, report, {"teacher": teacher}, 2, LABELS, say=lambda *a: None)
    again = build_target_cache(cfg, report, {"teacher": teacher}, 2, LABELS, say=lambda *a: None)
    assert (stats["computed"], again["computed"], again["reused"]) == (3, 0, 3)


def test_the_key_covers_every_setting_that_shapes_a_target_and_old_formats_are_named(tmp_path):
    import copy
    import json

    from tmad_ray.distill import targets

    cfg, report, _ = setup(tmp_path)
    _, teacher, assistant = models()
    frozen = {"teacher": teacher, "assistant": assistant}
    key = plan(cfg, 2, frozen, LABELS)["key"]
    changed = {
        "query rows": setup(tmp_path / "q", attn_query_tokens=8)[0],
        "augmentations": setup(tmp_path / "k", target_views=3)[0],
        "layer sets": config_from_dict({**cfg.model_dump(), "search": {"align_layer_sets": ["-1"]}}),
        "flips": config_from_dict({**cfg.model_dump(), "train": {**cfg.train.model_dump(), "flip": False}}),
    }
    for what, other in changed.items():
        assert plan(other, 2, frozen, LABELS)["key"] != key, what
    # the same weights with another head count: other attention maps, so another key
    regrouped = copy.deepcopy(teacher)
    regrouped.config.num_attention_heads = teacher.config.num_attention_heads * 2
    assert plan(cfg, 2, {"teacher": regrouped, "assistant": assistant}, LABELS)["key"] != key
    assert plan(cfg, 2, frozen, LABELS)["format"] == targets.FORMAT

    # a cache of an older format (or one written before spec.json) is named once, not used
    lines = []
    build_target_cache(cfg, report, {"teacher": teacher}, 2, LABELS, say=lines.append)
    assert not any("older format" in line for line in lines)
    store = TargetCache(cfg.storage.clip_cache, "old").store
    store.write_text(json.dumps({"format": targets.FORMAT - 1}), "targets", "oldformat", targets.SPEC_FILE)
    store.write_bytes(b"x", "targets", "nospec", "ab", "abab.pt")
    lines = []
    again = build_target_cache(cfg, report, {"teacher": teacher}, 2, LABELS, say=lines.append)
    (note,) = [line for line in lines if "older format" in line]
    assert "2 cache(s)" in note and "nospec" in note and "oldformat" in note and f"format {targets.FORMAT} now" in note
    assert again["reused"] == 3  # this key's own entries are still read
