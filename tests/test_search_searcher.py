"""The searcher pickles as Tune pickles it, for every algorithm and for several objectives, and a
restored searcher samples on exactly where it left off. Seconds, no Ray started: the next Optuna
release that breaks pickling fails here, not in a 10-minute study."""

import pickle

import pytest
import ray.cloudpickle

from tmad_ray.config import load_config
from tmad_ray.search.searcher import build_searcher, startup_trials
from tmad_ray.search.searcher import StudySampler

CASES = {
    "tpe": ("experiments/default.yaml", ["search.algorithm=tpe"]),
    "nsga2": ("experiments/default.yaml", ["search.algorithm=nsga2"]),
    "multi-objective": ("experiments/pareto.yaml", []),
}


def run_trials(searcher, cfg, ids: list[str]) -> list[dict]:
    """Suggest and complete trials as Tune's controller does; returns the suggested configs."""
    metrics = searcher.metric if isinstance(searcher.metric, list) else [searcher.metric]
    out = []
    for i, tid in enumerate(ids):
        config = searcher.suggest(tid)
        out.append(config)
        searcher.on_trial_complete(tid, {m: 0.1 + 0.05 * ((i * 7 + j) % 5) for j, m in enumerate(metrics)})
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_searcher_pickles_as_tune_pickles_it_and_resumes_exactly(case, tmp_path):
    path, overrides = CASES[case]
    cfg = load_config(path, overrides + ["search.num_samples=12"])
    searcher, _ = build_searcher(cfg)
    assert isinstance(searcher._sampler, StudySampler)
    # NSGA-II's generations need population_size (50) trials before they matter; its caches are warm
    # after any trial, and its lock exists from the start.
    run_trials(searcher, cfg, [f"t{i}" for i in range(6)])

    # tuner.pkl: the Tuner's state, with the searcher in it, through ray.cloudpickle
    ray.cloudpickle.dumps(searcher)
    # the experiment checkpoint: Searcher.save_to_dir, and restore_from_dir on --resume
    searcher.save_to_dir(str(tmp_path))
    restored, _ = build_searcher(cfg)
    restored.restore_from_dir(str(tmp_path))

    ids = [f"t{i}" for i in range(6, 10)]
    assert run_trials(restored, cfg, ids) == run_trials(searcher, cfg, ids)  # the same RNG, the same history


def test_sampler_pickles_with_its_locks_made_anew():
    import threading

    s = StudySampler("nsga2", seed=3)
    s.inner._another_lock = threading.Lock()  # what Optuna 5's NSGA-II added; any release may add one
    with pytest.raises(TypeError, match="lock"):
        pickle.dumps(s.inner)
    back = pickle.loads(pickle.dumps(s))
    assert type(back.inner) is type(s.inner) and back.algorithm == "nsga2"
    locks = [k for k, v in vars(s.inner).items() if isinstance(v, type(threading.Lock()))]
    assert "_another_lock" in locks
    assert all(isinstance(getattr(back.inner, k), type(threading.Lock())) for k in locks)
    assert back.inner._rng.rng.random() == s.inner._rng.rng.random()  # the random state came along


def test_tpe_models_results_after_a_third_of_the_study():
    cfg = load_config("experiments/default.yaml")
    assert startup_trials(cfg.search) <= cfg.search.num_samples // 3
    assert StudySampler("tpe", 0, startup_trials(cfg.search)).inner._n_startup_trials == startup_trials(cfg.search)
    cfg = load_config("experiments/default.yaml", ["search.startup_trials=5", "search.num_samples=9"])
    assert startup_trials(cfg.search) == 5


def test_startup_trials_above_the_study_is_refused():
    from tmad_ray.config import ConfigError

    with pytest.raises(ConfigError, match="startup_trials"):
        load_config("experiments/default.yaml", ["search.startup_trials=7", "search.num_samples=6"])


def test_the_searcher_and_asha_are_told_the_best_epoch_not_the_last():
    """A trial whose val accuracy peaks at epoch 2 and then falls: Optuna records the peak (the epoch
    whose student is exported), and ASHA compares trials on the same number."""
    from tmad_ray.train.loop import best_so_far

    cfg = load_config("experiments/default.yaml")
    searcher, scheduler = build_searcher(cfg)
    assert scheduler._metric == searcher.metric == "best_val_accuracy"
    searcher.suggest("t0")
    best, reports = {}, []
    for epoch, acc in enumerate([0.30, 0.55, 0.40, 0.35], start=1):
        metrics = {"epoch": epoch, "training_iteration": epoch, "val_accuracy": acc, "val_loss": 1.0 - acc}
        best = best_so_far(cfg, metrics, best)
        reports.append({**metrics, **best})
        searcher.on_trial_result("t0", reports[-1])
    assert [r["best_val_accuracy"] for r in reports] == [0.30, 0.55, 0.55, 0.55]
    searcher.on_trial_complete("t0", reports[-1])
    assert searcher._ot_study.trials[0].value == 0.55  # not 0.35, the last epoch's


def test_several_objectives_are_taken_at_the_best_epoch_of_the_metric():
    from tmad_ray.train.loop import best_so_far

    cfg = load_config("experiments/pareto.yaml")
    searcher, _ = build_searcher(cfg)
    assert searcher.metric == ["best_val_accuracy", "best_student_latency_ms"]
    best = {}
    for acc, ms in [(0.4, 3.0), (0.6, 3.5), (0.5, 2.0)]:
        best = best_so_far(cfg, {"val_accuracy": acc, "student_latency_ms": ms}, best)
    assert best == {"best_val_accuracy": 0.6, "best_student_latency_ms": 3.5}
    # a metric to minimize
    cfg = load_config("experiments/default.yaml", ["search.metric=val_loss", "search.mode=min"])
    best = {}
    for loss in [0.9, 0.7, 0.8]:
        best = best_so_far(cfg, {"val_loss": loss}, best)
    assert best == {"best_val_loss": 0.7}


def test_the_recipes_given_are_the_first_trials_then_the_search_goes_on():
    reference = {"alpha": 1.0, "beta": 1.0, "gamma": 0.5, "delta": 0.01, "temperature": 4.0, "align_layers": "-1,-2,-3"}
    cfg = load_config("experiments/quality.yaml")
    assert cfg.search.points_to_evaluate == [reference]  # the reference framework's recipe first
    searcher, _ = build_searcher(cfg)
    first, second = run_trials(searcher, cfg, ["t0", "t1"])
    assert {k: first[k] for k in reference} == reference and first["trial_number"] == 0
    assert {k: second[k] for k in reference} != reference
    with pytest.raises(Exception, match="points_to_evaluate: unknown keys \\['lr_typo'\\]"):
        load_config("experiments/quality.yaml", ["search.points_to_evaluate=[{lr_typo: 0.1}]"])
