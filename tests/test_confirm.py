"""Which recipe a study exports when its best trials are trained again on more seeds."""

import pytest

from tmad_ray import recipe
from tmad_ray.search.confirm import Candidate, confirm_table, pick, top_trials


def row(trial, value, status="COMPLETED", **extra):
    return {"trial": trial, "trial_number": int(trial[-1]), "alpha": 1.0, "beta": 2.0, "gamma": 0.5, "delta": 0.1,
            "temperature": 4.0, "align_layers": "-1,-2", "val_accuracy": value, "status": status, **extra}


def test_the_recipe_with_the_best_mean_wins_not_the_luckiest_single_run():
    lucky = Candidate(row("t1", 0.60), {"t1": 0.60, "confirm-t1-s1000": 0.30, "confirm-t1-s2000": 0.33})
    steady = Candidate(row("t2", 0.50), {"t2": 0.50, "confirm-t2-s1000": 0.52, "confirm-t2-s2000": 0.49})
    winner, run = pick([lucky, steady], "max")
    assert winner is steady and run == "confirm-t2-s1000"  # its best run is the one exported
    winner, run = pick([lucky, steady], "min")  # e.g. val_loss
    assert winner is lucky and run == "confirm-t1-s1000"


def test_a_failed_confirmation_run_leaves_the_recipe_judged_on_its_other_runs():
    a = Candidate(row("t1", 0.40), {"t1": 0.40, "confirm-t1-s1000": None})
    b = Candidate(row("t2", 0.39), {"t2": 0.39, "confirm-t2-s1000": 0.38})
    assert a.values() == [0.40] and pick([a, b], "max")[0] is a
    assert "failed" in confirm_table([a, b], "val_accuracy").splitlines()[2]
    with pytest.raises(ValueError):  # nothing at all to judge is not a silent pick
        pick([Candidate(row("t3", 0.1), {"t3": None})], "max")


def test_only_trials_that_trained_every_epoch_are_confirmed():
    rows = [row("t1", 0.9, status="STOPPED (ASHA)"), row("t2", 0.5), row("t3", None), row("t4", 0.7), row("t5", 0.6)]
    assert [r["trial"] for r in top_trials(rows, "val_accuracy", "max", 2)] == ["t4", "t5"]
    assert [r["trial"] for r in top_trials(rows, "val_accuracy", "min", 1)] == ["t2"]


def test_a_confirmation_trains_the_trials_own_recipe():
    from tmad_ray.config import config_from_dict

    params = recipe.of(row("t1", 0.5, lr=3e-4))
    cfg = recipe.apply(config_from_dict({"search": {"lr": [1e-4, 1e-3]}}), params)
    d = cfg.distill
    assert (d.alpha, d.beta, d.gamma, d.delta, d.temperature, d.align_layers, cfg.train.lr) == \
        (1.0, 2.0, 0.5, 0.1, 4.0, [-1, -2], 3e-4)


def test_confirmation_needs_a_single_objective():
    from tmad_ray.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="search: confirm_top_k ranks recipes by one metric"):
        config_from_dict({"search": {"confirm_top_k": 2, "objectives": ["val_accuracy", "student_latency_ms"]}})
