"""A study's results without running one: the results table, the Pareto front, Optuna's plots, the
start-up summary."""

import json
import os

from tmad_ray.config import load_config
from tmad_ray.search.results import results_table


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
    from tmad_ray.search.results import objective_modes, pareto_front

    rows = [{"trial": t, "val_accuracy": a, "student_latency_ms": l}
            for t, a, l in [("a", 0.9, 10.0), ("b", 0.8, 5.0), ("c", 0.7, 6.0), ("d", 0.9, 12.0), ("e", None, 1.0)]]
    front = pareto_front(rows, ["val_accuracy", "student_latency_ms"], ["max", "min"])
    assert [r["trial"] for r in front] == ["a", "b"]  # c is beaten by b, d by a; e has no result
    cfg = load_config(None, ["search.objectives=[val_accuracy,student_latency_ms]"])
    assert objective_modes(cfg) == (["val_accuracy", "student_latency_ms"], ["max", "min"])


def test_optuna_plots_keep_failed_trials_in_their_place(tmp_path, monkeypatch):
    """Optuna numbers the rebuilt study's trials by position: a failed trial stays in as FAIL, so
    trial #2 of the runs is trial 2 of the plots."""
    from optuna.visualization import matplotlib as ovm

    from tmad_ray.plots import optuna_plots
    from tmad_ray.recipe import distributions

    plotted = []
    real = ovm.plot_optimization_history
    monkeypatch.setattr(ovm, "plot_optimization_history", lambda study: plotted.append(study) or real(study))
    cfg = load_config(None)
    recipe = {"alpha": 1.0, "beta": 2.0, "gamma": 0.1, "delta": 0.5, "temperature": 4.0, "align_layers": "-1"}
    rows = [{"trial_number": i, **recipe, "val_accuracy": v} for i, v in enumerate([0.5, None, 0.75])]
    paths = optuna_plots(rows, distributions(cfg.search), "val_accuracy", "max", str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["optuna_history.png", "optuna_importance.png"]
    assert [(t.number, t.state.name, t.value) for t in plotted[0].trials] == \
        [(0, "COMPLETE", 0.5), (1, "FAIL", None), (2, "COMPLETE", 0.75)]
    assert optuna_plots([{**rows[1], "trial_number": 0}], distributions(cfg.search), "val_accuracy", "max",
                        str(tmp_path / "none")) == []  # nothing finished


def test_the_startup_summary_is_the_median_of_each_phase(tmp_path):
    from tmad_ray.search.results import startup_summary

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
