"""``tmad-ray bench time-to-quality``: its curves and verdict by hand, then the whole benchmark at smoke size;
and ``bench startup``, the floor under a trial's start-up."""

import json
import math
import os

import pytest

from conftest import smoke_config
from tmad_ray.bench.time_to_quality import (best_so_far, format_table, plot, run_ttq_bench, study_epochs, summarize,
                                            time_to_reach)


def test_best_so_far_keeps_only_improvements_in_time_order():
    points = [(30.0, 0.4), (10.0, 0.25), (20.0, 0.25), (40.0, 0.35), (50.0, 0.55), (45.0, 0.4)]
    assert best_so_far(points) == [(10.0, 0.25), (30.0, 0.4), (50.0, 0.55)]
    curve = best_so_far(points)
    assert time_to_reach(curve, 0.4) == 30.0 and time_to_reach(curve, 0.5) == 50.0
    assert time_to_reach(curve, 0.6) is None and best_so_far([]) == []


def test_study_epochs_come_from_the_trials_logs(tmp_path):
    for trial, rows in {"t1": [(105.0, 0.25), (110.0, 0.5)], "t2": [(120.0, 0.75)]}.items():
        (tmp_path / trial).mkdir()
        lines = [{"time": 101.0, "event": "startup", "startup_s": 3.0}]
        lines += [{"time": t, "event": "epoch_end", "epoch": i + 1, "val_accuracy": v} for i, (t, v) in enumerate(rows)]
        (tmp_path / trial / "train_log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert sorted(study_epochs(tmp_path, 100.0)) == [(5.0, 0.25), (10.0, 0.5), (20.0, 0.75)]


def _side(seconds, points, best, test):
    return {"seconds": seconds, "curve": best_so_far(points), "best_val_accuracy": best, "test_accuracy": test,
            "epochs_trained": 10}


def test_time_to_target_is_read_off_both_curves_the_same_way(tmp_path):
    cfg = smoke_config(tmp_path, tmp_path)
    runs = [{"seed": 0, "seed_way": _side(400.0, [(100.0, 0.5), (300.0, 0.6)], 0.6, 0.55),
             "tmad_ray": _side(200.0, [(50.0, 0.4), (100.0, 0.6), (150.0, 0.7)], 0.7, 0.65)},
            {"seed": 1, "seed_way": _side(400.0, [(100.0, 0.7)], 0.7, 0.6),
             "tmad_ray": _side(200.0, [(80.0, 0.5)], 0.5, 0.45)},
            {"seed": 2, "seed_way": _side(500.0, [(100.0, 0.5)], 0.5, 0.5),
             "tmad_ray": _side(200.0, [(150.0, 0.5)], 0.5, 0.55)}]
    r = summarize(cfg, runs, teacher_test=0.65)
    best, near, teacher = r["summary"]["time_to_target"]
    assert [best["target"], near["target"], teacher["target"]] == ["seed_way_best", "95%_of_seed_way_best",
                                                                  "teacher_test_accuracy"]
    # seed 0: the seed way first has 0.6 at 300 s, tmad_ray at 100 s (not "100 s of the seed way's 400")
    assert best["seed_way_s"] == [300.0, 100.0, 100.0] and best["tmad_ray_s"] == [100.0, None, 150.0]
    assert best["ratio"][0] == pytest.approx(3.0) and best["ratio"][2] == pytest.approx(100 / 150)
    # tmad_ray never reaches seed 1's 0.7: ratio 0 (infinitely slow), kept in the median, not left out
    assert best["ratio"][1] == 0.0 and best["median_ratio"] == pytest.approx(100 / 150)
    # 95 % of 0.6 = 0.57: the seed way has it at 300 s; 95 % of 0.7 = 0.665 is still out of tmad_ray's reach
    assert near["seed_way_s"] == [300.0, 100.0, 100.0] and near["tmad_ray_s"] == [100.0, None, 150.0]
    # 0.65: only tmad_ray's seed 0 and the seed way's seed 1 get there; seed 2 neither: left out and counted
    assert teacher["ratio"] == [math.inf, 0.0, None] and teacher["neither_reached"] == 1
    s = r["summary"]
    assert s["tmad_ray_test"]["mean"] == pytest.approx(0.55) and s["seed_way_test"]["mean"] == pytest.approx(0.55)
    assert s["tmad_ray_test"]["sd"] == pytest.approx(0.1)
    r.update(videos={"train": 8, "val": 4, "test": 4}, chance=0.25, machine={"cpus": 2}, benchmark_minutes=3.0)
    table = format_table(r)
    assert "| 1 | 400 | 0.700 | 0.600 | 200 | 0.500 | 0.450 | 10 of 4 |" in table
    assert "| seed_way_best | 300 s, 100 s, 100 s | 100 s, never, 150 s | 3.00×, 0.00×, 0.67× | 0.67× |" in table
    assert table.endswith("tmad_ray is 0.67× the seed way's speed (median of 3 seeds; > 1 means tmad_ray gets there "
                          "sooner); chosen recipes score 0.550 ± 0.100 (tmad_ray) vs 0.550 ± 0.050 (seed way) on test")
    assert plot(r, str(tmp_path / "ttq.png")) and (tmp_path / "ttq.png").stat().st_size > 1000


@pytest.mark.integration
def test_time_to_quality_runs_both_ways_on_the_same_recipes(synth_root, smoke_zoo, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = smoke_config(tmp_path, synth_root, *smoke_zoo, "search.num_samples=2", "search.grace_period=1",
                       "train.epochs=2")
    out = tmp_path / "ttq.json"
    r = run_ttq_bench(cfg, str(out), seeds=[0], say=lambda *a: None)
    # registering the best student used MLflow's fluent API: its tracking URI must not stay in this
    # process's environment, where every later subprocess (another tune.py) would inherit it
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert json.loads(out.read_text())["summary"] == r["summary"]
    (run,) = r["runs"]
    system, seed_way = run["tmad_ray"], run["seed_way"]
    assert len(system["recipes"]) == 2 and len(seed_way["trials"]) == 2
    assert seed_way["chosen"] in system["recipes"] and system["chosen"] in system["recipes"]
    # The seed's way trains every recipe to the end: one val point per epoch, the clock running across trials.
    times = [t for t, _ in seed_way["epochs"]]
    assert len(times) == 4 and times == sorted(times) and times[-1] <= seed_way["seconds"]
    assert 2 <= len(system["epochs"]) <= 4 and 0 < system["epochs"][0][0] < system["seconds"]
    for side in (system, seed_way):
        assert 0 <= side["test_accuracy"] <= 1
        assert side["curve"][-1][1] == side["best_val_accuracy"]
    assert r["videos"] == {"train": 8, "val": 4, "test": 4}
    assert 0 <= r["teacher_test_accuracy"] <= 1  # the toy teacher has the dataset's labels
    assert [t["target"] for t in r["summary"]["time_to_target"]] == ["seed_way_best", "95%_of_seed_way_best",
                                                                     "teacher_test_accuracy"]
    assert run["time_to_target"][0]["seed_way_s"] is not None  # the seed way reaches its own best
    assert (tmp_path / "ttq.png").stat().st_size > 1000 and r["seeds_planned"] == [0]
    # tmad_ray's clock includes the Ray it started, and stopped: nothing is left for the next local Ray
    import ray

    assert not ray.is_initialized() and "RAY_API_SERVER_ADDRESS" not in os.environ


@pytest.mark.integration
def test_the_startup_floor_bench_times_empty_ray_train_trials(tmp_path):
    from tmad_ray.bench.startup import format_table as format_startup
    from tmad_ray.bench.startup import run_startup_bench

    r = run_startup_bench(str(tmp_path / "startup.json"), trials=1, variants=["health_check_0.5s_1_worker"],
                          say=lambda *a: None, import_repeats=1)
    v = r["variants"]["health_check_0.5s_1_worker"]
    assert len(v["to_loop_s"]) == 1 and 0 < v["to_loop_median_s"] < v["trial_wall_s"]
    assert set(r["imports_s"]) == {"torch", "ray.train.torch", "transformers VideoMAE", "mlflow"}
    assert json.loads((tmp_path / "startup.json").read_text())["variants"] == r["variants"]
    assert format_startup(r).splitlines()[3].startswith("| health_check_0.5s_1_worker | ")
