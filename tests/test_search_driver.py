"""The study's driver without running a study: the search space, a trial's recipe, how many trials
run at once, layer sets, study names and resume, and the study's storage (local or a URI)."""

import json
import os
import pickle

import optuna
import pytest

from tmad_ray.config import load_config
from tmad_ray.search.driver import STATE_FILE, StudyError, check_layer_sets, concurrent_trials, study_name
from tmad_ray.recipe import apply, define_space, distributions, space_for
from tmad_ray.search.trial import TRIAL_CPU


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


def test_a_trials_recipe_is_applied_to_its_config():
    cfg = load_config(None)
    got = apply(cfg, {"alpha": 2.0, "beta": 0.5, "gamma": 0.1, "delta": 0.3, "temperature": 3.0,
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


SIZED = "models.student={depth: 4, width: 96, heads: 3, patch_size: 8}"


def test_student_depth_is_searched_only_for_depth_width_heads_students():
    cfg = load_config(None, ["search.student_depths=[2,4]", "search.align_layer_sets=[\"-1\",\"-1,-2\"]", SIZED])
    trial = optuna.create_study().ask()
    space_for(cfg.search)(trial)
    assert trial.params["student_depth"] in (2, 4)
    assert apply(cfg, {"student_depth": 2}).models.student.depth == 2
    check_layer_sets(cfg, 4)
    with pytest.raises(StudyError, match="-1,-2,-3"):
        check_layer_sets(load_config(None, ["search.student_depths=[2,4]", SIZED]), 4)  # "-1,-2,-3" needs depth 3
    with pytest.raises(StudyError, match="depth/width/heads"):
        check_layer_sets(load_config(None, ["search.student_depths=[2]", "models.student={size: vit-s}"]), 12)
    with pytest.raises(StudyError, match="depth/width/heads"):  # a pretrained student's depth is its own
        check_layer_sets(load_config(None, ["search.student_depths=[2]"]), 4)
    with pytest.raises(Exception, match="objectives"):
        load_config(None, ["search.objectives=[val_accuracy,latency]"])


def test_study_state_and_the_clip_cache_live_in_one_storage_local_or_uri(tmp_path):
    from tmad_ray.data.cache import ClipCache
    from tmad_ray.storage import Storage

    for root in (str(tmp_path / "local"), f"file://{tmp_path}/uri"):
        st = Storage(root)
        st.write_text('{"parent_run_id": "p"}', "default-1", STATE_FILE)
        assert st.is_file("default-1", STATE_FILE) and not st.is_file("default-2", STATE_FILE)
        assert json.loads(st.read_text("default-1", STATE_FILE)) == {"parent_run_id": "p"}
        assert st.read_bytes("default-2", STATE_FILE) is None and st.subdirs() == ["default-1"]
        assert st.uri("default-1", "train") == f"{root}/default-1/train"
        assert pickle.loads(pickle.dumps(st)).uri("x") == st.uri("x")  # travels to Ray tasks as its root
        cfg = load_config(None, [f"storage.ray_results={root}"])
        assert study_name(cfg, True) == ("default-1", True)
        cache = ClipCache(f"{root}/cache")  # the clip cache on the same layer: a URI cache has URI entries
        assert cache.entry_uri("ab" * 32) == f"{root}/cache/ab/{'ab' * 32}.parquet"
        assert st.size_bytes() == st.size_bytes("default-1") > 0
