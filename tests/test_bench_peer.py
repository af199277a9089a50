"""``tmad-ray bench peer``: the HF Trainer + Optuna pipeline on its own, the summary by hand, and the
whole benchmark (both pipelines, one seed) at smoke size."""

import json
import math
import os
import statistics

import numpy as np
import pytest
import torch

from conftest import smoke_config
from tmad_ray.bench.peer import ClipDataset, format_table, plot, recipe_pairs, run_hf_trainer, run_peer_bench, summarize
from tmad_ray.bench.time_to_quality import best_so_far
from tmad_ray.data.manifest import load_manifest


def test_the_peers_dataset_draws_a_fresh_clip_every_time(synth_root, tmp_path):
    cfg = smoke_config(tmp_path, synth_root, "data.image_size=24")  # a 24² crop of the 32² video: room to move
    d = cfg.data
    ds = ClipDataset(load_manifest(d.root, d.label_mode, d.val_fraction, d.split_seed), d, flip=True)
    assert len(ds) == len(ds.rows) * d.train_views
    torch.manual_seed(0)
    a, b = ds[0], ds[0]
    assert a["pixel_values"].shape == (8, 3, 24, 24) and a["pixel_values"].dtype == torch.float32
    assert int(a["labels"]) == ds.label2id[ds.rows[0].label]
    assert not torch.equal(a["pixel_values"], b["pixel_values"])  # a new start, crop or flip per item
    torch.manual_seed(0)
    assert torch.equal(ds[0]["pixel_values"], a["pixel_values"])  # from torch's generator: reproducible


def _side(points, best, test, trials):
    return {"seconds": 100.0, "curve": best_so_far(points), "best_val_accuracy": best, "test_accuracy": test,
            "trials": trials}


def _trial(alpha, acc, epochs=2):
    params = {"alpha": alpha, "beta": 0.5, "gamma": 0.5, "delta": 0.5, "temperature": 4.0, "align_layers": "-1"}
    return {"params": params, "best_val_accuracy": acc, "epochs": epochs}


def test_summary_reads_both_curves_the_same_way_and_pairs_the_same_recipes(tmp_path):
    cfg = smoke_config(tmp_path, tmp_path)
    runs = [{"seed": 0, "hf_trainer": _side([(10.0, 0.5), (40.0, 0.6)], 0.6, 0.55, [_trial(1.0, 0.6), _trial(2.0, 0.4)]),
             "tmad_ray": _side([(20.0, 0.6), (30.0, 0.7)], 0.7, 0.65, [_trial(1.0, 0.7), _trial(3.0, 0.2)])},
            {"seed": 1, "hf_trainer": _side([(10.0, 0.7)], 0.7, 0.6, [_trial(1.5, 0.7)]),
             "tmad_ray": _side([(80.0, 0.5)], 0.5, 0.45, [_trial(1.5, 0.5)])}]
    r = summarize(cfg, runs, teacher_test=0.8)
    best, near, teacher = r["summary"]["time_to_target"]
    assert best["target"] == "hf_trainer_best" and best["hf_trainer_s"] == [40.0, 10.0]
    assert best["tmad_ray_s"] == [20.0, None] and best["ratio"] == [2.0, 0.0]
    assert near["tmad_ray_s"] == [20.0, None]  # 0.57 first at 20 s; 0.665 never
    assert teacher["ratio"] == [None, None] and teacher["neither_reached"] == 2 and teacher["median_ratio"] is None
    # only recipes trained on both sides are paired: alpha 1.0 (seed 0) and 1.5 (seed 1)
    assert [p["recipe"]["alpha"] for p in runs[0]["recipe_pairs"]] == [1.0]
    parity = r["summary"]["recipe_parity"]
    assert parity["pairs"] == 2
    assert parity["tmad_ray_minus_hf_best_val"]["mean"] == pytest.approx((0.1 - 0.2) / 2)
    half = 12.706 * np.std([0.1, -0.2], ddof=1) / math.sqrt(2)  # t(0.975, 1 dof)
    assert parity["tmad_ray_minus_hf_best_val"]["ci95"] == pytest.approx([-0.05 - half, -0.05 + half], rel=1e-3)
    assert r["summary"]["test_diff"]["mean"] == pytest.approx((0.10 - 0.15) / 2)
    r.update(videos={"train": 8, "val": 4, "test": 4}, chance=0.25, machine={"cpus": 2}, benchmark_minutes=3.0)
    table = format_table(r)
    assert "| hf_trainer_best | 40 s, 10 s | 20 s, never | 2.00×, 0.00× | 1.00× |" in table
    assert "(2 pairs): tmad_ray − HF best val -0.050 [" in table
    assert plot(r, str(tmp_path / "peer.png")) and (tmp_path / "peer.png").stat().st_size > 1000


def test_recipe_pairs_need_every_knob_equal():
    a, b = _trial(1.0, 0.5), _trial(1.0, 0.4)
    b["params"]["align_layers"] = "-1,-2"
    assert recipe_pairs({"tmad_ray": {"trials": [a]}, "hf_trainer": {"trials": [b]}}) == []


@pytest.mark.integration
def test_the_hf_trainer_peer_searches_with_optuna_and_scores_its_best_student(synth_root, smoke_zoo, pretrained_student,
                                                                             tmp_path):
    cfg = smoke_config(tmp_path, synth_root, *smoke_zoo, *pretrained_student, "search.num_samples=2",
                       "search.grace_period=1", "train.epochs=2", "train.num_workers=1")
    r = run_hf_trainer(cfg, say=lambda *a: None)
    assert len(r["trials"]) == 2 and all(1 <= t["epochs"] <= 2 for t in r["trials"])
    assert set(r["trials"][0]["params"]) == {"alpha", "beta", "gamma", "delta", "temperature", "align_layers"}
    assert r["best_val_accuracy"] == max(t["best_val_accuracy"] for t in r["trials"])
    assert r["curve"][-1][1] == r["best_val_accuracy"] and 0 <= r["test_accuracy"] <= 1
    assert r["seconds"] >= r["curve"][-1][0] > 0


@pytest.mark.integration
def test_bench_peer_runs_both_pipelines_on_one_seed(synth_root, smoke_zoo, pretrained_student, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cfg = smoke_config(tmp_path, synth_root, *smoke_zoo, *pretrained_student, "search.num_samples=2",
                       "search.grace_period=1", "train.epochs=2", "train.num_workers=1")
    out = tmp_path / "peer.json"
    r = run_peer_bench(cfg, str(out), seeds=[0], say=lambda *a: None)
    saved = json.loads(out.read_text())
    assert saved["summary"]["time_to_target"][0]["target"] == "hf_trainer_best"
    run = saved["runs"][0]
    assert run["hf_trainer"]["curve"] and run["tmad_ray"]["curve"]
    # TPE's start-up trials are random draws of the same seeded sampler on both sides: the same recipes
    assert r["summary"]["recipe_parity"]["pairs"] >= 1
    # and each HF trial trained its own recipe: the model was built with the trial's sampled values
    hf = run["hf_trainer"]
    built = [b for b in hf["built_with"] if b]  # (the last build, of the chosen student, has no trial)
    assert [{k: b[k] for k in ("alpha", "beta", "temperature")} for b in built] == \
        [{k: t["params"][k] for k in ("alpha", "beta", "temperature")} for t in hf["trials"]]
    assert len({b["alpha"] for b in built}) == len(built) == 2
    assert (tmp_path / "peer.png").exists() and saved["seeds_planned"] == [0]
    # the Ray it started and stopped leaves no State API address behind for the next local Ray's cleaner
    assert "RAY_API_SERVER_ADDRESS" not in os.environ


def test_grace_finds_the_first_epoch_from_which_the_winner_survives_the_cut(tmp_path):
    from tmad_ray.bench.grace import grace_table, load_histories, recommended, run_grace_bench, spearman

    # seed 0: "late" is at chance until epoch 3, then wins; a cut at epoch 1 or 2 (top half of 4) drops it
    h = {0: {"late": [0.25, 0.25, 0.50, 0.70], "early": [0.40, 0.45, 0.45, 0.45], "mid": [0.30, 0.35, 0.40, 0.40],
             "flat": [0.25, 0.25, 0.25, 0.25]},
         1: {"late": [0.20, 0.50, 0.60, 0.60], "early": [0.40, 0.40, 0.40, 0.40], "mid": [0.20, 0.30, 0.30, 0.30],
             "flat": [0.25, 0.25, 0.25, 0.25]}}
    rows = grace_table(h, reduction_factor=2)
    assert [r["winner_survives"] for r in rows] == [0.0, 0.5, 1.0]
    assert recommended(rows) == 3
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0) and spearman([1, 1], [1, 2]) is None
    assert rows[2]["rank_correlation"] == pytest.approx(statistics.mean([1.0, spearman([0.6, 0.4, 0.3, 0.25],
                                                                                        [0.6, 0.4, 0.3, 0.25])]))
    for seed, runs in h.items():  # the same from run directories, as the quality benchmark leaves them
        for recipe, vals in runs.items():
            d = tmp_path / f"quality-quality-20261205-000000-{recipe}-s{seed}"
            d.mkdir()
            d.joinpath("train_log.jsonl").write_text("".join(
                json.dumps({"event": "epoch_end", "epoch": i + 1, "val_accuracy": v}) + "\n" for i, v in enumerate(vals)))
    assert load_histories(sorted(tmp_path.iterdir())) == h
    r = run_grace_bench(str(tmp_path / "quality-*"), str(tmp_path / "grace.json"))
    assert r["recommended_grace"] == 3 and json.loads((tmp_path / "grace.json").read_text())["rows"] == rows
