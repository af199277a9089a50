"""Cohort trials as a study runs them: the hub, one Ray Train run per cohort, each student to its trial."""

import json
import threading
import time
from pathlib import Path

import pytest

from conftest import EXPERIMENTS_DIR, smoke_config
from tmad_ray import tracking, tracking_queue

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def logs(out: Path, study: str) -> dict[str, list[dict]]:
    return {p.parent.name: [json.loads(line) for line in p.open()]
            for p in (out / study / "trials").glob("*/train_log.jsonl")}


def test_a_study_in_cohorts_stopped_by_sigterm_resumes_each_cohort_from_its_checkpoint(synth_root, smoke_zoo,
                                                                                       pretrained_student, tmp_path):
    """(First in this module: its own Ray, before the module's.) SIGTERM once both students have a
    checkpointed epoch, then ``--resume``: the two trials go back into their cohort, whose run goes on
    from its checkpoint, and the study ends as one that was never stopped."""
    import signal
    import subprocess
    import sys

    from test_search import check_study, env, epoch_ends, study_overrides

    args = [sys.executable, str(REPO / "tune.py"), "--config", str(EXPERIMENTS_DIR / "smoke.yaml"),
            *study_overrides(tmp_path, synth_root, [*smoke_zoo, *pretrained_student], "search.num_samples=2",
                             "train.epochs=12", "search.cohort_size=2", "search.grace_period=12")]
    with open(tmp_path / "run.log", "w") as log:
        run = subprocess.Popen(args, cwd=tmp_path, env=env(), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and run.poll() is None and \
                sum(1 in e for e in epoch_ends(tmp_path).values()) < 2:
            time.sleep(0.5)
        assert run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(3)  # Ray Train registers the epoch's checkpoint on its controller's next poll
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=300) == 130, (tmp_path / "run.log").read_text()[-3000:]
    again = subprocess.run([*args, "--resume"], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    check_study(tmp_path, 2, 12, distinct_ends=False)
    study = next((tmp_path / "ray").glob("smoke-*"))
    assert list(json.loads((study / "cohorts.json").read_text())) == ["cohort_0000"]  # the same cohort, resumed
    for trial, log in logs(tmp_path / "out", study.name).items():
        starts = [e for e in log if e["event"] == "start"]
        assert [s["resumed"] for s in starts] == [False, True] and starts[1]["epoch"] >= 1, trial
        assert sorted(set(epoch_ends(tmp_path)[trial])) == list(range(1, 13))


def test_a_cohort_drops_the_students_tune_ends_stops_a_diverging_one_alone_and_survives_a_dead_worker(
        ray_local, synth_root, smoke_zoo, pretrained_student, tmp_path):
    """Three students in one run of 2 DDP workers: B's trial is ended by "Tune" after epoch 1 (as ASHA
    ends one), C's loss is not finite at epoch 1, rank 1 dies at the first step of epoch 2. A goes on
    alone, from the epoch-1 checkpoint, and its trial gets each epoch once."""
    from transformers import VideoMAEForVideoClassification

    from tmad_ray.search import cohorts
    from tmad_ray.search.trial import StudyContext
    from tmad_ray.study import prepare_study

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = smoke_config(tmp_path, synth_root, *smoke_zoo, *pretrained_student, f"tracking.tracking_uri={uri}",
                       "train.epochs=3", "search.cohort_size=3", "faults.kill_worker_at=[2, 1]",
                       "train.warmup_ratio=0", "train.grad_clip=null")
    manifest, report, _ = prepare_study(cfg, quiet=True)
    name = "cohort-test"
    client = tracking.client(uri)
    exp_id = tracking.experiment_id(client, "tmad_ray")
    parent = tracking.open_parent(client, exp_id, name)
    queue = tracking_queue.start(uri, name)
    out = Path(cfg.storage.output_dir)
    study = StudyContext(name, cfg.model_dump(), manifest, report, exp_id, parent, str(out / name / "trials"),
                         str(Path(cfg.storage.ray_results) / name / "train"), queue)
    hub = cohorts.start(study, 3, 0.0, 1, cfg.storage.ray_results)
    base = {"alpha": 1.0, "beta": 0.5, "gamma": 0.1, "delta": 0.0, "temperature": 2.0, "align_layers": "-1"}
    recipes = {"A": base, "B": {**base, "beta": 0.0}, "C": {**base, "lr": 1e30}}
    for t, p in recipes.items():
        queue.open_child.remote(exp_id, parent, name, t, t, t, None, p)
    got: dict[str, list[dict]] = {t: [] for t in recipes}

    def trial(t):  # what join_and_relay does, with this test as Tune
        import ray

        ray.get(hub.join.remote(t, recipes[t]))
        after = 0
        while True:
            msg = ray.get(hub.next.remote(t, after))
            if "metrics" not in msg:
                got[t].append(msg)
                return
            got[t].append(msg["metrics"])
            after = msg["metrics"]["epoch"]
            if t == "B":
                hub.trial_ended.remote(t, "stopped by the test")
                return
            if "non_finite_loss" in msg["metrics"]:
                return
    threads = [threading.Thread(target=trial, args=(t,), daemon=True) for t in recipes]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    import ray

    assert not any(th.is_alive() for th in threads), ray.get(hub.snapshot.remote())
    assert [m.get("epoch") for m in got["A"]] == [1, 2, 3, None] and got["A"][-1] == {"end": None}
    assert [m["epoch"] for m in got["B"]] == [1]
    diverged = got["C"][-1]["epoch"]  # lr 1e30: its loss is not finite at some epoch, which ends it
    assert [m["epoch"] for m in got["C"]] == list(range(1, diverged + 1)) and diverged < 3
    assert got["C"][-1]["non_finite_loss"] == diverged and all("non_finite_loss" not in m for m in got["C"][:-1])
    assert [m["cohort_students"] for m in got["A"][:3]] == [1 + (e == 1) + (e <= diverged) for e in (1, 2, 3)]
    assert got["A"][2]["best_val_accuracy"] == max(m["val_accuracy"] for m in got["A"][:3])

    trial_logs = logs(out, name)
    a = trial_logs["A"]
    assert [e["resumed"] for e in a if e["event"] == "start"] == [False, True]  # rank 1 died, the run resumed
    assert [e["epoch"] for e in a if e["event"] == "epoch_end"] == [1, 2, 3]
    assert any(e["event"] == "startup" for e in a)
    assert [e["epoch"] for e in trial_logs["B"] if e["event"] == "epoch_end"] == [1]
    assert any(e["event"] == "stopped" for e in trial_logs["B"])
    assert [e["epoch"] for e in trial_logs["C"] if e["event"] == "non_finite_loss"] == [diverged]
    assert list(out.glob("killed_*"))

    # each student's best, exported as it improved, beside the run's checkpoints (C's, if it had a
    # finite epoch before it diverged)
    best = Path(cfg.storage.ray_results) / name / "train" / "cohort_0000" / "best"
    assert sorted(p.name for p in best.iterdir()) == ["A", "B"] + (["C"] if diverged > 1 else [])
    model = VideoMAEForVideoClassification.from_pretrained(best / "A")
    assert model.config.id2label == {0: "A", 1: "B1", 2: "B2", 3: "G"}
    saved = json.loads((Path(cfg.storage.ray_results) / name / cohorts.COHORTS_FILE).read_text())
    assert list(saved) == ["cohort_0000"] and sorted(saved["cohort_0000"]) == ["A", "B", "C"]

    # MLflow: each student's epochs in its own run
    tracking_queue.drain(queue, say=lambda *a: None)
    runs = {r.data.tags[tracking.TRIAL_TAG]: r for r in client.search_runs([exp_id])
            if tracking.TRIAL_TAG in r.data.tags}
    steps = {t: sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy"))
             for t, r in runs.items()}
    assert steps == {"A": [1, 2, 3], "B": [1], "C": list(range(1, diverged))}
    assert "not finite" in runs["C"].data.tags["non_finite_loss"]
    ray.kill(hub)
    ray.kill(queue)


def test_a_study_in_cohorts_is_a_study_of_students(synth_root, smoke_zoo, pretrained_student, tmp_path, ray_local,
                                                    capsys, monkeypatch):
    """``python tune.py`` with ``search.cohort_size: 2``: 3 trials in a cohort of 2 and one of 1, each a
    Tune trial and an MLflow run of its own, the best student exported and registered as ever."""
    from test_search import check_study, study_overrides

    from tmad_ray.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["tune", "--config", str(EXPERIMENTS_DIR / "smoke.yaml"),
               *study_overrides(tmp_path, synth_root, [*smoke_zoo, *pretrained_student], "search.num_samples=3",
                                "train.epochs=2", "search.cohort_size=2", "search.cohort_wait_s=2")])
    captured = capsys.readouterr()
    assert rc == 0, captured.out[-3000:] + captured.err[-3000:]
    assert "in cohorts of up to 2 students" in captured.out
    assert "cohorts   up to 2 students trained side by side" in captured.out
    check_study(tmp_path, 3, 2, root=synth_root, distinct_ends=False)  # cohort mates may end in one second
    study_dir = next((tmp_path / "ray").glob("smoke-*"))
    saved = json.loads((study_dir / "cohorts.json").read_text())
    assert sorted(len(t) for t in saved.values()) == [1, 2]
    together = [e for log in logs(tmp_path / "out", study_dir.name).values() for e in log
                if e["event"] == "epoch_end" and e["cohort_students"] == 2]
    assert together  # two students did share an epoch


def test_a_cohort_that_cannot_fit_a_worker_is_refused_before_the_study(synth_root, smoke_zoo, tmp_path, ray_local):
    from tmad_ray.models.hf import load_models
    from tmad_ray.study import CohortTooBig, check_cohort_memory
    from tmad_ray.train.cohort import largest_fitting, peak_bytes

    cfg = smoke_config(tmp_path, synth_root, *smoke_zoo, "search.cohort_size=2")
    models = load_models(cfg, ["A", "B1", "B2", "G"])
    assert peak_bytes(cfg, models, 1) < peak_bytes(cfg, models, 2) < peak_bytes(cfg, models, 4)
    assert largest_fitting(cfg, models, peak_bytes(cfg, models, 4) / 0.9) == 4
    assert 0 < check_cohort_memory(cfg, models) == peak_bytes(cfg, models, 2)
    cfg.search.cohort_size = 10_000_000  # 10 M smoke students: far more than this machine's RAM
    with pytest.raises(CohortTooBig, match=r"search.cohort_size 10000000: .* use search.cohort_size \d+ or fewer"):
        check_cohort_memory(cfg, models)
    cfg.search.cohort_size, cfg.train.batch_size = 2, 10 ** 9
    with pytest.raises(CohortTooBig, match="not even one student fits; lower train.batch_size"):
        check_cohort_memory(cfg, models)
