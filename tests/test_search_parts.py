"""The search without running one: space, recipe, concurrency, study names, tracking URI, tables."""

import json
import os
import pickle

import optuna
import pytest

from tmad_ray import tracking
from tmad_ray.config import config_from_dict, load_config
from tmad_ray.search.space import apply_params, define_space, distributions, space_for
from tmad_ray.search.tuner import (STATE_FILE, TRIAL_CPU, StudyError, check_layer_sets, close_trial_runs, concurrent_trials,
                                   results_table, study_name)


def test_define_by_run_space_samples_within_bounds_and_pickles():
    cfg = load_config(None, ["search.lr=[1e-4,1e-2]"])
    space = space_for(cfg.search)
    assert pickle.loads(pickle.dumps(space)).keywords == space.keywords  # no lambda: experiment state pickles
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for i in range(20):
        trial = study.ask()
        assert space(trial) == {"trial_number": i}  # a constant of the config: runs and tables name trials by it
        p = trial.params
        for k in ("alpha", "beta", "gamma", "delta", "temperature", "lr"):
            lo, hi = getattr(cfg.search, k)
            assert lo <= p[k] <= hi
        assert p["align_layers"] in cfg.search.align_layer_sets
        study.tell(trial, 0.5)
    assert set(distributions(cfg.search)) == set(study.trials[0].params)
    no_lr = optuna.create_study().ask()
    define_space(*space_for(load_config(None).search).args, no_lr)
    assert "lr" not in no_lr.params


def test_apply_params_sets_the_recipe_of_a_trial():
    cfg = load_config(None)
    got = apply_params(cfg, {"alpha": 2.0, "beta": 0.5, "gamma": 0.1, "delta": 0.3, "temperature": 3.0,
                             "align_layers": "-1,-3", "lr": 1e-3})
    d = got.distill
    assert (d.alpha, d.beta, d.gamma, d.delta, d.temperature, d.align_layers) == (2.0, 0.5, 0.1, 0.3, 3.0, [-1, -3])
    assert got.train.lr == 1e-3 and cfg.distill.alpha == 1.0  # the original is untouched


def test_a_local_ray_runs_as_many_trials_as_fill_its_cores(monkeypatch):
    from tmad_ray.cluster import cpus_needed, local_trials

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    one = load_config(None, ["train.num_workers=1"])
    assert local_trials(one) == 2 and local_trials(load_config(None, ["train.num_workers=2"])) == 1
    assert local_trials(load_config(None, ["train.num_workers=1", "search.max_concurrent_trials=1"])) == 1
    assert local_trials(load_config(None, ["train.num_workers=1", "search.num_samples=1"])) == 1
    assert local_trials(load_config(None, ["train.num_workers=1", "train.use_gpu=true"])) == 1
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert local_trials(load_config(None, ["train.num_workers=2"])) == 6  # 8 would fit; the study has 6 trials
    # a local Ray sized for k trials (their workers, their drivers, one CPU kept free) runs k at once
    for cfg in (one, load_config(None, ["train.num_workers=2"])):
        k = local_trials(cfg)
        assert concurrent_trials(cfg, {"CPU": cpus_needed(cfg, k, TRIAL_CPU)}) == k


def test_concurrent_trials_from_cluster_resources():
    cfg = load_config(None, ["train.num_workers=2"])  # 2 workers x 1 CPU, plus the trial driver's CPU
    assert concurrent_trials(cfg, {"CPU": 4}) == 1
    assert concurrent_trials(cfg, {"CPU": 16}) == 5
    gpu = load_config(None, ["train.use_gpu=true", "train.num_workers=4"])
    assert concurrent_trials(gpu, {"CPU": 64, "GPU": 8}) == 2
    capped = load_config(None, ["search.max_concurrent_trials=2"])
    assert concurrent_trials(capped, {"CPU": 64}) == 2


def test_layer_sets_must_fit_the_student():
    check_layer_sets(load_config(None), 4)
    with pytest.raises(StudyError, match=r"'-1,-2,-3': aligned layer -3 .*depth 2"):
        check_layer_sets(load_config(None), 2)


def test_study_names_and_resume(tmp_path):
    cfg = load_config(None, [f"storage.ray_results={tmp_path}"])
    name, resuming = study_name(cfg, None)
    assert name.startswith("default-") and not resuming
    with pytest.raises(StudyError, match="no study of 'default'"):
        study_name(cfg, True)
    for n in ("default-1", "default-2"):
        (tmp_path / n).mkdir()
        (tmp_path / n / STATE_FILE).write_text("{}")
    os.utime(tmp_path / "default-1" / STATE_FILE, (1, 1))
    assert study_name(cfg, True) == ("default-2", True)
    assert study_name(cfg, "default-1") == ("default-1", True)
    with pytest.raises(StudyError, match="no study 'nope'"):
        study_name(cfg, "nope")


def test_tracking_uri_from_config_environment_or_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(config_from_dict({}).tracking) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.resolve_tracking_uri(config_from_dict({}).tracking) == "http://mlflow:5000"
    explicit = config_from_dict({"tracking": {"tracking_uri": "sqlite:///x.db"}}).tracking
    assert tracking.resolve_tracking_uri(explicit) == f"sqlite:///{tmp_path}/x.db"


def test_rank_0_finds_the_child_run_the_trial_opens_beside_it(tmp_path, monkeypatch):
    import threading
    import time

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/m.db"
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "e")
    parent = tracking.open_parent(c, exp, "study-1")
    tracking.open_child(c, exp, parent, "study-0", "t1", "trial_1")  # the same trial id in another study
    assert tracking.trial_run_id(c, {"run_id": "abc"}) == "abc"
    opened = {}

    def open_later():
        time.sleep(1.0)
        opened["id"] = tracking.open_child(tracking.client(uri), exp, parent, "study-1", "t1", "trial_1")
    thread = threading.Thread(target=open_later)
    thread.start()
    found = tracking.trial_run_id(c, {"experiment_id": exp, "study": "study-1", "trial": "t1"}, timeout_s=30)
    thread.join()
    assert found == opened["id"]
    with pytest.raises(tracking.TrackingError, match="did not appear in 1 s"):
        tracking.trial_run_id(c, {"experiment_id": exp, "study": "study-1", "trial": "t9"}, timeout_s=1)


def test_parent_and_child_runs_are_found_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts a new experiment's artifacts under ./mlruns
    c = tracking.client(f"sqlite:///{tmp_path}/m.db")
    exp = tracking.experiment_id(c, "e")
    parent = tracking.open_parent(c, exp, "study-1")
    child = tracking.open_child(c, exp, parent, "study-1", "t1", "trial_1")
    c.set_terminated(child, status="FAILED")
    again = tracking.open_child(c, exp, parent, "study-1", "t1", "trial_1")
    assert again == child and c.get_run(child).info.status == "RUNNING"
    # a trial Tune lost (driver killed before it saved it) is sampled again under a new id: same run
    lost = tracking.open_child(c, exp, parent, "study-1", "t7", "trial_7", trial_number=3)
    c.set_terminated(lost, status="KILLED")
    again = tracking.open_child(c, exp, parent, "study-1", "t8", "trial_8", trial_number=3)
    assert again == lost and c.get_run(lost).data.tags[tracking.TRIAL_TAG] == "t8"
    assert tracking.open_child(c, exp, parent, "study-2", "t9", "trial_9", trial_number=3) != lost
    assert c.get_run(child).data.tags[tracking.PARENT_TAG] == parent
    metrics = {"epoch": 2, "val_accuracy": 0.5, "val_per_class": {"A": 1.0, "B 1?": 0.0}, "flag": True,
               "val_confusion": [[1, 0], [1, 0]]}
    assert tracking.epoch_metrics(metrics) == {"epoch": 2.0, "val_accuracy": 0.5, "val_acc/A": 1.0,
                                               "val_acc/B 1_": 0.0}
    tracking.log_epoch(c, child, metrics, ["A", "B 1?"])
    names = {a.path for a in c.list_artifacts(child)}
    assert names == {"confusion_matrix.png", "per_class.json"}
    assert [m.step for m in c.get_metric_history(child, "val_accuracy")] == [2]
    # MLflow's compare page plots the first metric it meets: the best so far, then validation
    assert list(tracking.epoch_metrics({**metrics, "best_val_accuracy": 0.5}))[:2] == ["best_val_accuracy",
                                                                                     "val_accuracy"]


def test_child_runs_end_as_tune_says_their_trials_ended(tmp_path, monkeypatch):
    """A trial killed by Tune mid-update may leave its run RUNNING or even FAILED; the driver's
    close sets every child from Tune's results, at the time of the trial's last report (not the
    study's end), and puts an errored trial's error on its run and its best score in its name."""
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"tracking": {"experiment": "e"}})
    c = tracking.client(f"sqlite:///{tmp_path}/m.db")
    exp = tracking.experiment_id(c, "e")
    parent = tracking.open_parent(c, exp, "study-1")
    runs = {t: tracking.open_child(c, exp, parent, "study-1", t, f"trial_{t}") for t in ("a", "b", "c", "d")}
    c.set_terminated(runs["a"], status="FAILED")  # a racing shutdown got there first
    other = tracking.open_child(c, exp, parent, "study-2", "a", "trial_a")  # another study's run: untouched
    recipe = {"alpha": 1.0, "beta": 2.0, "gamma": 0.1, "delta": 0.5, "temperature": 4.0, "align_layers": "-1"}
    rows = [{"trial": "a", "trial_number": 0, **recipe, "val_accuracy": 0.75, "epochs": 4, "status": "COMPLETED",
             "error": None, "ended": 1_700_000_000},
            {"trial": "b", "trial_number": 1, **recipe, "val_accuracy": 0.5, "epochs": 1, "status": "STOPPED (ASHA)",
             "error": None, "ended": 1_700_000_100},
            {"trial": "c", "trial_number": 2, **recipe, "val_accuracy": None, "epochs": 0, "status": "ERROR",
             "error": "RuntimeError: out of memory", "ended": None}]
    close_trial_runs(c, cfg, "study-1", rows)
    status = {t: c.get_run(r).info.status for t, r in runs.items()}
    assert status == {"a": "FINISHED", "b": "FINISHED", "c": "FAILED", "d": "KILLED"}
    assert c.get_run(runs["c"]).data.tags["tune_error"] == "RuntimeError: out of memory"
    assert c.get_run(runs["a"]).data.metrics["best_val_accuracy"] == 0.75
    assert c.get_run(runs["b"]).data.tags["tune_status"] == "STOPPED (ASHA)"
    assert c.get_run(other).info.status == "RUNNING"
    # each run ends when its trial did; the names say the number, the score, the recipe, an ASHA stop
    assert c.get_run(runs["a"]).info.end_time == 1_700_000_000_000
    assert c.get_run(runs["b"]).info.end_time == 1_700_000_100_000
    assert c.get_run(runs["a"]).info.run_name == "#0 val 0.750 · a=1 b=2 g=0.1 d=0.5 T=4.0 L=[-1]"
    assert c.get_run(runs["b"]).info.run_name.endswith("L=[-1] (stopped at epoch 1)")
    assert c.get_run(runs["c"]).info.run_name == "#2 a=1 b=2 g=0.1 d=0.5 T=4.0 L=[-1]"


def test_the_mlflow_view_names_trials_and_keeps_the_parent_short():
    from tmad_ray.search.tuner import progress_reporter, runs_url, study_params

    cfg = load_config(None)
    params = study_params(cfg)
    searched = ("alpha", "beta", "gamma", "delta", "temperature", "align", "layers")
    assert len(params) <= 12 and not any(w in k for k in params for w in searched)  # "alpha" once, on the trials
    assert tracking.layers_param("-1") == "[-1]"  # never looks like a number to MLflow's charts
    assert runs_url("sqlite:////x/mlflow.db", "3") == ("http://127.0.0.1:5000/#/experiments/3/runs?workflowType="
                                                        "machine_learning&orderByKey=metrics.%60best_val_accuracy%60"
                                                        "&orderByAsc=false")
    assert runs_url("https://u:pw@mlflow.example/", "3").startswith("https://***@mlflow.example/#/experiments/3/runs?")
    r = progress_reporter(cfg)  # Tune's live table: what a user watches, not the first four metrics
    assert r._metric_columns == {"epoch": "epoch", "val_accuracy": "accuracy", "best_val_accuracy": "best so far",
                                 "train_loss": "loss"}
    assert list(r._parameter_columns) == ["trial_number", "alpha", "beta", "gamma", "delta", "temperature",
                                          "align_layers"]


def test_results_table_has_a_row_per_trial():
    rows = [{"trial": "a1", "alpha": 1.0, "beta": 2.0, "gamma": 0.1, "delta": 0.5, "temperature": 4.0,
             "align_layers": "-1", "val_accuracy": 0.75, "epochs": 4, "status": "COMPLETED"},
            {"trial": "b2", "alpha": None, "beta": None, "gamma": None, "delta": None, "temperature": None,
             "align_layers": None, "val_accuracy": None, "epochs": 0, "status": "ERROR"}]
    table = results_table(rows, "val_accuracy").splitlines()
    assert table[0] == "| # | trial | alpha | beta | gamma | delta | T | layers | best val_accuracy | epochs | status |"
    assert table[2] == "| - | a1 | 1 | 2 | 0.1 | 0.5 | 4.00 | -1 | 0.750 | 4 | COMPLETED |"
    assert table[3].startswith("| - | b2 | - |") and table[3].endswith("| 0 | ERROR |")


def test_pareto_front_by_hand():
    from tmad_ray.search.tuner import objective_modes, pareto_front

    rows = [{"trial": t, "val_accuracy": a, "student_latency_ms": l}
            for t, a, l in [("a", 0.9, 10.0), ("b", 0.8, 5.0), ("c", 0.7, 6.0), ("d", 0.9, 12.0), ("e", None, 1.0)]]
    front = pareto_front(rows, ["val_accuracy", "student_latency_ms"], ["max", "min"])
    assert [r["trial"] for r in front] == ["a", "b"]  # c is beaten by b, d by a; e has no result
    cfg = load_config(None, ["search.objectives=[val_accuracy,student_latency_ms]"])
    assert objective_modes(cfg) == (["val_accuracy", "student_latency_ms"], ["max", "min"])


def test_student_depth_is_searched_only_for_depth_width_heads_students():
    cfg = load_config(None, ["search.student_depths=[2,4]", "search.align_layer_sets=[\"-1\",\"-1,-2\"]"])
    trial = optuna.create_study().ask()
    space_for(cfg.search)(trial)
    assert trial.params["student_depth"] in (2, 4)
    assert apply_params(cfg, {"student_depth": 2}).models.student.depth == 2
    check_layer_sets(cfg, 4)
    with pytest.raises(StudyError, match="-1,-2,-3"):
        check_layer_sets(load_config(None, ["search.student_depths=[2,4]"]), 4)  # "-1,-2,-3" needs depth 3
    with pytest.raises(StudyError, match="depth/width/heads"):
        check_layer_sets(load_config(None, ["search.student_depths=[2]", "models.student={size: vit-s}"]), 12)
    with pytest.raises(Exception, match="objectives"):
        load_config(None, ["search.objectives=[val_accuracy,latency]"])


def test_study_state_lives_in_local_or_uri_storage(tmp_path):
    from tmad_ray.search.tuner import Storage

    for root in (str(tmp_path / "local"), f"file://{tmp_path}/uri"):
        st = Storage(root)
        st.write_text('{"parent_run_id": "p"}', "default-1", STATE_FILE)
        assert st.exists("default-1", STATE_FILE) and not st.exists("default-2", STATE_FILE)
        assert json.loads(st.read_text("default-1", STATE_FILE)) == {"parent_run_id": "p"}
        assert [n for _, n in st.studies("default-")] == ["default-1"]
        assert st.uri("default-1", "train") == f"{root}/default-1/train"
        cfg = load_config(None, [f"storage.ray_results={root}"])
        assert study_name(cfg, True) == ("default-1", True)


def test_optuna_plots_keep_failed_trials_in_their_place(tmp_path, monkeypatch):
    """Optuna numbers the rebuilt study's trials by position: a failed trial stays in as FAIL, so
    trial #2 of the runs is trial 2 of the plots."""
    from optuna.visualization import matplotlib as ovm

    from tmad_ray.search.tuner import optuna_plots

    plotted = []
    real = ovm.plot_optimization_history
    monkeypatch.setattr(ovm, "plot_optimization_history", lambda study: plotted.append(study) or real(study))
    cfg = load_config(None)
    recipe = {"alpha": 1.0, "beta": 2.0, "gamma": 0.1, "delta": 0.5, "temperature": 4.0, "align_layers": "-1"}
    rows = [{"trial_number": i, **recipe, "val_accuracy": v} for i, v in enumerate([0.5, None, 0.75])]
    paths = optuna_plots(cfg, rows, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["optuna_history.png", "optuna_importance.png"]
    assert [(t.number, t.state.name, t.value) for t in plotted[0].trials] == \
        [(0, "COMPLETE", 0.5), (1, "FAIL", None), (2, "COMPLETE", 0.75)]
    assert optuna_plots(cfg, [{**rows[1], "trial_number": 0}], str(tmp_path / "none")) == []  # nothing finished


def test_the_startup_summary_is_the_median_of_each_phase(tmp_path):
    from tmad_ray.search.tuner import startup_summary

    assert startup_summary(tmp_path) is None
    for i, (setup, start, models, first, total) in enumerate([(1, 10, 4, 1, 17), (2, 12, 6, 2, 23), (3, 8, 5, 0.5, 19)]):
        (tmp_path / f"t{i}").mkdir()
        event = {"event": "startup", "trial_setup_s": setup, "ray_train_start_s": start, "imports_s": 0.1,
                 "models_s": models, "ddp_s": 0.2, "data_and_checkpoint_s": 0.0, "first_step_s": first,
                 "startup_s": total}
        (tmp_path / f"t{i}" / "train_log.jsonl").write_text(
            json.dumps({"event": "start"}) + "\n" + json.dumps(event) + "\n" + json.dumps({"event": "epoch_end"}) + "\n")
    line = startup_summary(tmp_path)
    assert line.startswith("trial start-up (median of 3): 19.0 s to the first step = 2.0 s trial set-up + 10.0 s Ray "
                           "Train start (controller, worker processes) + 5.0 s models + 1.0 s first step")


def test_mlflow_fluent_tracking_does_not_leak_to_later_subprocesses(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.fluent_tracking(f"sqlite:///{tmp_path}/a.db"):
        assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/a.db" == mlflow.get_tracking_uri()
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mine:5000")
    with tracking.fluent_tracking(f"sqlite:///{tmp_path}/a.db"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mine:5000" == mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(None)
