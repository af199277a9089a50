"""The proof benchmarks' parts: recipes of the quality bench, the reference trial, the GPU bench at toy size."""

import json
import statistics

import pytest

from conftest import smoke_config
from tmad_ray.bench.gpu import run_gpu_bench, step_flops, vit_flops
from tmad_ray.bench.quality import format_table as quality_table
from tmad_ray.bench.quality import apply_recipe, recipes, summarize
from tmad_ray.data.manifest import load_manifest


def test_quality_recipes_baselines_and_one_ablation_per_term(tmp_path):
    cfg = smoke_config(tmp_path, tmp_path)
    (tmp_path / "out" / "smoke-1").mkdir(parents=True)
    best = {"alpha": 1.5, "beta": 2.0, "gamma": 0.3, "delta": 0.7, "temperature": 3.0, "align_layers": "-1,-2"}
    (tmp_path / "out" / "smoke-1" / "best.json").write_text(json.dumps({"study": "smoke-1", **best}))
    r, source = recipes(cfg, "searched")
    assert source.endswith("smoke-1/best.json") and r["searched"] == best
    assert {"searched", "reference_default", "ce_only", "logit_kd"} <= set(r)
    assert r["ce_only"] == {"temperature": 3.0, "align_layers": "-1,-2", "alpha": 1.0, "beta": 0.0, "gamma": 0.0,
                            "delta": 0.0}
    # the reference framework's defaults: feature 1.0, attention 0.5, teacher 1.0 / assistant 0.8, T 4, -1,-2,-3
    ref = apply_recipe(cfg, r["reference_default"]).distill
    assert (ref.alpha, ref.beta, ref.gamma, ref.delta, ref.temperature) == (1.0, 1.0, 0.5, 0.0, 4.0)
    assert (ref.teacher_weight, ref.assistant_weight, ref.align_layers) == (1.0, 0.8, [-1, -2, -3])
    kd = apply_recipe(cfg, r["logit_kd"]).distill
    assert (kd.beta, kd.gamma, kd.delta, kd.relations, kd.assistant_weight) == (0.0, 0.0, 1.0, False, 0.0)
    for term in ("alpha", "beta", "gamma", "delta"):
        assert r[f"no_{term}"] == {**best, term: 0.0}
    # the training set-up's differences, each on its own, on the reference recipe
    pool, decay = apply_recipe(cfg, r["reference_view_pool"]), apply_recipe(cfg, r["reference_decay_all"])
    assert (pool.data.train_view_pool, pool.data.cached_train_views, pool.distill.beta) == (8, 8, 1.0)
    assert decay.train.decay_all_params and not pool.train.decay_all_params and decay.data == cfg.data
    cfg_recipe, src = recipes(cfg, "config")
    assert src == "config" and cfg_recipe["searched"]["align_layers"] == "-1"
    with pytest.raises(FileNotFoundError, match="python tune.py"):
        recipes(smoke_config(tmp_path / "none", tmp_path), "searched")


def test_quality_statistics_are_paired_t_intervals_by_hand():
    runs = [{"recipe": n, "seed": s, "test_accuracy": a, "val_accuracy": a}
            for n, accs in {"ce_only": [0.50, 0.60, 0.55], "searched": [0.60, 0.68, 0.66],
                            "logit_kd": [0.40, 0.70, 0.55]}.items() for s, a in enumerate(accs)]
    out = summarize(runs, ["ce_only", "searched", "logit_kd"], teacher=0.8)
    t = 4.302652729911275  # t(0.975, df 2)
    m = out["summary"]["ce_only"]
    assert m["test_accuracy_mean"] == pytest.approx(0.55)
    assert m["ci95"] == pytest.approx([0.55 - t * 0.05 / 3 ** 0.5, 0.55 + t * 0.05 / 3 ** 0.5])
    assert out["summary"]["searched"]["vs_teacher"] == pytest.approx((0.60 + 0.68 + 0.66) / 3 / 0.8)
    d = out["paired_vs_ce_only"]["searched"]  # diffs 0.10, 0.08, 0.11: small spread, CI above 0
    sd = statistics.stdev([0.10, 0.08, 0.11])
    assert d["mean_diff"] == pytest.approx(0.29 / 3) and d["ci95"][0] == pytest.approx(0.29 / 3 - t * sd / 3 ** 0.5)
    assert d["better"] and not d["worse"]
    # the same mean as ce_only unpaired, but noisy: neither better nor worse
    assert not out["paired_vs_ce_only"]["logit_kd"]["better"] and not out["paired_vs_ce_only"]["logit_kd"]["worse"]
    # the searched recipe against every other one, seed by seed: searched − logit_kd = 0.20, -0.02, 0.11
    v = out["paired_searched_vs"]["logit_kd"]
    assert v["mean_diff"] == pytest.approx(0.29 / 3) and v["seeds"] == 3 and not v["better"]
    assert out["paired_searched_vs"]["ce_only"]["mean_diff"] == pytest.approx(d["mean_diff"])
    assert "searched" not in out["paired_searched_vs"]
    r = {"budget": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "workers": 1}, "seeds": [0, 1, 2], "chance": 0.25,
         "recipe_source": "config", "n_train": 8, "n_val": 200, "n_test": 200, "student_init": "scratch",
         "teacher_test_accuracy": 0.8, "recipes": {"ce_only": {"alpha": 1, "beta": 0, "gamma": 0, "delta": 0,
                                                               "temperature": 3.0, "align_layers": "-1"},
                                                   "searched": {"alpha": 1, "beta": 2, "gamma": 0.3, "delta": 0.7,
                                                                "temperature": 3.0, "align_layers": "-1,-2"},
                                                   "logit_kd": {"alpha": 1, "beta": 0, "gamma": 0, "delta": 1,
                                                                "temperature": 4.0}}, **out}
    table = quality_table(r)
    assert "| ce_only | 1 | 0 | 0 | 0 | 3.00 | -1 | 0.550 [" in table and "| baseline |" in table
    assert f"| +{0.29 / 3:.3f} [" in table and "**better**" in table and "**searched better**" in table
    assert out["paired_setup_vs_reference"] == {} and "the reference recipe with" not in table


def test_a_setup_variant_is_paired_against_the_reference_recipe():
    from tmad_ray.bench.quality import REFERENCE_DEFAULT, SETUP_VARIANTS

    accs = {"ce_only": [0.3, 0.3], "reference_default": [0.50, 0.60], "reference_decay_all": [0.45, 0.50]}
    runs = [{"recipe": n, "seed": s, "test_accuracy": a, "val_accuracy": a} for n, xs in accs.items()
            for s, a in enumerate(xs)]
    out = summarize(runs, list(accs), teacher=None)
    d = out["paired_setup_vs_reference"]["reference_decay_all"]  # -0.05, -0.10
    assert d["mean_diff"] == pytest.approx(-0.075) and d["seeds"] == 2 and set(out["paired_setup_vs_reference"]) == {
        "reference_decay_all"}
    r = {"budget": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "workers": 1}, "seeds": [0, 1], "chance": 0.25,
         "recipe_source": "config", "n_train": 8, "n_val": 200, "n_test": 200, "student_init": "scratch",
         "recipes": {"ce_only": {"alpha": 1, "beta": 0, "gamma": 0, "delta": 0}, "reference_default": REFERENCE_DEFAULT,
                     "reference_decay_all": {**REFERENCE_DEFAULT, **SETUP_VARIANTS["reference_decay_all"]}}, **out}
    assert "| reference_decay_all: train.decay_all_params=True | -0.075 [" in quality_table(r)


def test_quality_resummarize_recomputes_a_finished_benchmark(tmp_path):
    from tmad_ray.bench.quality import resummarize

    runs = [{"recipe": n, "seed": s, "test_accuracy": a, "val_accuracy": a}
            for n, accs in {"ce_only": [0.5, 0.6], "searched": [0.6, 0.65]}.items() for s, a in enumerate(accs)]
    base = {"budget": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "workers": 1}, "seeds": [0, 1], "chance": 0.25,
            "recipe_source": "config", "n_train": 8, "n_val": 200, "n_test": 200, "student_init": "scratch",
            "teacher_test_accuracy": None, "runs": runs,
            "recipes": {n: {"alpha": 1, "beta": 0, "gamma": 0, "delta": 0} for n in ("ce_only", "searched")}}
    out = tmp_path / "quality.json"
    out.write_text(json.dumps(base))  # as a run of an older version left it: no paired_searched_vs
    r = resummarize(str(out))
    assert r["paired_searched_vs"]["ce_only"]["mean_diff"] == pytest.approx(0.075)
    assert json.loads(out.read_text())["summary"]["searched"]["test_accuracy"] == [0.6, 0.65]
    assert (tmp_path / "quality.png").stat().st_size > 1000


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


@pytest.mark.integration
def test_quality_bench_runs_paired_recipes_from_a_pretrained_student(synth_root, smoke_zoo, pretrained_student,
                                                                     tmp_path, ray_local):
    from tmad_ray.bench.quality import run_quality_bench

    cfg = smoke_config(tmp_path, synth_root, *smoke_zoo, *pretrained_student, "train.epochs=1", "train.num_workers=1")
    out = tmp_path / "quality.json"
    r = run_quality_bench(cfg, str(out), seeds=[0, 1], recipe="config", variants=["searched"], say=lambda *a: None)
    assert json.loads(out.read_text())["paired_vs_ce_only"] == r["paired_vs_ce_only"]
    assert (r["n_val"], r["n_test"], r["seeds"]) == (4, 4, [0, 1])
    assert r["student_init"].startswith("pretrained: ") and 0 <= r["teacher_test_accuracy"] <= 1
    assert sorted((x["recipe"], x["seed"]) for x in r["runs"]) == [("ce_only", 0), ("ce_only", 1), ("searched", 0),
                                                                   ("searched", 1)]
    s = r["summary"]["searched"]
    assert s["ci95"][0] <= s["test_accuracy_mean"] <= s["ci95"][1]
    d = r["paired_vs_ce_only"]["searched"]
    assert d["seeds"] == 2 and d["mean_diff"] == pytest.approx(
        statistics.mean(s["test_accuracy"]) - statistics.mean(r["summary"]["ce_only"]["test_accuracy"]))
    assert (tmp_path / "quality.png").stat().st_size > 1000
