"""The proof benchmarks' parts: recipes of the quality bench, the reference trial, the GPU bench at toy size."""

import json

import pytest

from conftest import smoke_config
from tmad_ray.bench.gpu import run_gpu_bench, step_flops, vit_flops
from tmad_ray.bench.quality import format_table as quality_table
from tmad_ray.bench.quality import recipes
from tmad_ray.data.manifest import load_manifest


def test_quality_variants_switch_off_one_term_each(tmp_path):
    cfg = smoke_config(tmp_path, tmp_path)
    (tmp_path / "out" / "smoke-1").mkdir(parents=True)
    best = {"alpha": 1.5, "beta": 2.0, "gamma": 0.3, "delta": 0.7, "temperature": 3.0, "align_layers": "-1,-2"}
    (tmp_path / "out" / "smoke-1" / "best.json").write_text(json.dumps({"study": "smoke-1", **best}))
    r, source = recipes(cfg, "searched")
    assert source.endswith("smoke-1/best.json") and r["distilled"] == best
    assert r["ce_only"] == {**best, "alpha": 1.0, "beta": 0.0, "gamma": 0.0, "delta": 0.0}
    assert r["no_beta"]["beta"] == 0 and r["no_beta"]["gamma"] == 0.3
    assert r["no_gamma"]["gamma"] == 0 and r["no_delta"]["delta"] == 0 and r["no_delta"]["beta"] == 2.0
    cfg_recipe, src = recipes(cfg, "config")
    assert src == "config" and cfg_recipe["distilled"]["align_layers"] == "-1"
    with pytest.raises(FileNotFoundError, match="python tune.py"):
        recipes(smoke_config(tmp_path / "none", tmp_path), "searched")
    table = quality_table({"budget": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "workers": 2}, "seeds": [0, 1],
                           "chance": 0.25, "recipe_source": "config",
                           "summary": {"ce_only": {"recipe": r["ce_only"], "test_accuracy_mean": 0.5,
                                                   "test_accuracy_std": 0.1, "test_accuracy": [0.4, 0.6]}}})
    assert "| ce_only | 1 | 0 | 0 | 0 | 3.00 | -1,-2 | 0.500 ± 0.100 | 0.40, 0.60 |" in table


def test_reference_trial_runs_one_trial_the_reference_way(synth_root, smoke_zoo, tmp_path):
    from tmad_ray.bench.search import reference_trial

    cfg = smoke_config(tmp_path, synth_root, *smoke_zoo, "train.epochs=2")
    r = reference_trial(cfg, load_manifest(synth_root), {"alpha": 1.0, "beta": 1.0, "gamma": 0.5, "delta": 0.5,
                                                          "temperature": 2.0, "align_layers": "-1"}, say=lambda *a: None,
                        test=True)
    assert 0 <= r["best_val_accuracy"] <= 1 and r["seconds"] > 0 and 0 <= r["test_accuracy"] <= 1
    # one val accuracy per epoch, timed within the trial; the best is the best of them
    assert len(r["history"]) == 2 and 0 < r["history"][0][0] < r["history"][1][0] <= r["seconds"]
    assert r["best_val_accuracy"] == max(v for _, v in r["history"])


def test_flops_count_by_hand():
    assert vit_flops(1, 2, 3) == 24 * 3 * 4 + 4 * 9 * 2
    archs = {"student": (1, 2, 1), "teacher": (1, 2, 1)}
    assert step_flops(archs, 3, 2, frozen=True) == 2 * 4 * vit_flops(1, 2, 3)
    assert step_flops(archs, 3, 2, frozen=False) == 2 * 3 * vit_flops(1, 2, 3)


def test_gpu_bench_runs_at_toy_size_on_cpu(tmp_path):
    r = run_gpu_bench(str(tmp_path / "gpu.json"), tiny=True, steps=1)
    assert [row["name"] for row in r["rows"]][-1] == "tri + attn@2, 256 rows, target cache"
    assert all(row["tflops"] > 0 and row["mfu"] is None for row in r["rows"])  # no GPU: no peak, no MFU
    assert json.loads((tmp_path / "gpu.json").read_text())["tiny"] is True
