"""The search as users run it: tune.py killed and resumed, and `ray job submit` on a real local head."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from tmad_ray import tracking

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


def study_overrides(tmp_path, root, zoo, *extra):
    return [f"data.root={root}", "data.synthetic=null", f"storage.clip_cache={tmp_path / 'clips'}",
            f"storage.output_dir={tmp_path / 'out'}", f"storage.ray_results={tmp_path / 'ray'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *zoo, *extra]


def env(**extra):
    # never the State API address of this process's Ray (conftest's ray_local): a subprocess has its own
    inherited = {k: v for k, v in os.environ.items() if k != "RAY_API_SERVER_ADDRESS"}
    return {**inherited, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
            "PATH": f"{BIN}:{os.environ['PATH']}", **extra}


def study_runs(uri: str, experiment: str = "tmad_ray"):
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if tracking.PARENT_TAG not in r.data.tags]
    children = [r for r in runs if tracking.PARENT_TAG in r.data.tags]
    return c, parents, children


def check_study(tmp_path, n_trials: int, epochs: int, root=None, distinct_ends: bool = True):
    """One parent, one child per trial with its params and per-epoch metrics, nothing left RUNNING,
    each child ended when its trial did and named by its number and recipe, the parent's params
    short, the best student exported (loads with from_pretrained) and registered as an MLflow model
    from the trial that trained it."""
    from transformers import VideoMAEForVideoClassification

    c, parents, children = study_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(parents) == 1 and len(children) == n_trials
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags.get("mlflow.source.git.commit")
    assert {c_.data.tags[tracking.PARENT_TAG] for c_ in children} == {parent.info.run_id}
    ends = []
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"alpha", "beta", "gamma", "delta", "temperature", "align_layers", "epochs"} <= set(child.data.params)
        assert child.data.params["align_layers"].startswith("[")  # never a number to MLflow's charts
        number = child.data.params["trial_number"]
        assert child.info.run_name.startswith(f"#{number} val ") and " a=" in child.info.run_name
        assert child.data.tags[tracking.NOTE_TAG].startswith(f"Trial #{number} of study")
        history = c.get_metric_history(child.info.run_id, "val_accuracy")
        assert 1 <= len(history) and sorted({m.step for m in history}) == list(range(1, max(m.step for m in history) + 1))
        best = {m.step: m.value for m in c.get_metric_history(child.info.run_id, "best_val_accuracy")}
        by_step = {m.step: m.value for m in history}
        assert all(best[s] == max(v for k, v in by_step.items() if k <= s) for s in by_step)  # the best so far
        assert {"train_ce", "train_feat", "val_macro_f1", "clips_per_s", "best_val_accuracy"} <= set(child.data.metrics)
        assert {a.path for a in c.list_artifacts(child.info.run_id)} >= {"confusion_matrix.png", "per_class.json"}
        last_epoch = max(m.timestamp for m in c.get_metric_history(child.info.run_id, "epoch"))
        assert -1000 <= child.info.end_time - last_epoch < 60_000  # its trial's end (Tune's whole seconds)
        ends.append(child.info.end_time)
    if distinct_ends:
        assert len(set(ends)) == n_trials
    # every trial's log says where its first seconds went, from the trial's first line to its first step
    for log in (tmp_path / "out").glob("*/trials/*/train_log.jsonl"):
        startup = [json.loads(line) for line in log.open() if '"startup"' in line][0]
        phases = [startup[k] for k in ("trial_setup_s", "ray_train_start_s", "imports_s", "models_s", "ddp_s",
                                       "data_and_checkpoint_s", "first_step_s")]
        assert all(p >= 0 for p in phases) and sum(phases) <= startup["startup_s"] + 0.5
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "search_space.json", "results.md", "results.csv", "optuna_history.png"} <= arts
    searched = ("alpha", "beta", "gamma", "delta", "temperature", "layers")
    assert not any(w in k for k in parent.data.params for w in searched) and len(parent.data.params) <= 12
    assert "best_val_accuracy" in parent.data.metrics
    best_trial = parent.data.tags["best_trial"].split("(")[1].rstrip(")")
    best_child = next(ch for ch in children if ch.data.tags[tracking.TRIAL_TAG] == best_trial)
    versions = c.search_model_versions("name='tmad_ray_student'")
    assert [v.run_id for v in versions] == [best_child.info.run_id]  # the trial that trained it
    assert c.get_model_version_by_alias("tmad_ray_student", "champion").run_id == best_child.info.run_id
    assert versions[0].tags["alpha"] == f"{float(best_child.data.params['alpha']):.4g}"
    studies = [p for p in (tmp_path / "out").iterdir() if (p / "best_student").is_dir()]
    assert len(studies) == 1
    model = VideoMAEForVideoClassification.from_pretrained(studies[0] / "best_student")
    assert model.config.id2label == {0: "A", 1: "B1", 2: "B2", 3: "G"}
    if root is not None:  # the registered version is an MLflow model that classifies a video
        import mlflow

        video = sorted((root / "videos").glob("*.mp4"))[0]
        with tracking.fluent_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}"):  # not leaked to later subprocesses
            out = mlflow.pyfunc.load_model("models:/tmad_ray_student@champion").predict([str(video)])
        assert out["label"][0] in {"A", "B1", "B2", "G"} and pd.isna(out["error"][0])
    return parent, children


def epoch_starts(tmp_path) -> dict[str, list[int]]:
    logs = (tmp_path / "out").glob("*/trials/*/train_log.jsonl")
    return {p.parent.name: [json.loads(line)["epoch"] for line in p.open() if '"epoch_start"' in line] for p in logs}


def epoch_ends(tmp_path) -> dict[str, list[int]]:
    logs = (tmp_path / "out").glob("*/trials/*/train_log.jsonl")
    return {p.parent.name: [json.loads(line)["epoch"] for line in p.open() if '"epoch_end"' in line] for p in logs}


def test_a_killed_then_interrupted_study_resumes_without_rerunning_finished_trials(synth_root, smoke_zoo, tmp_path):
    """The driver killed outright (SIGKILL to its process group: a lost session) once the first trial
    has finished, resumed, then interrupted with Ctrl-C (SIGINT to the process group, as a terminal
    sends it) during a later trial, and resumed again to the end."""
    args = [sys.executable, str(REPO / "tune.py"), "--config", str(REPO / "experiments" / "smoke.yaml"),
            *study_overrides(tmp_path, synth_root, smoke_zoo, "search.num_samples=3")]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(args, cwd=tmp_path, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and first.poll() is None:
            if any(2 in ends for ends in epoch_ends(tmp_path).values()):
                break
            time.sleep(1)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(4)  # let Tune record the finished trial
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started die together
        first.wait()
    before = epoch_starts(tmp_path)
    assert before, "no trial started before the kill"
    finished_before = [t for t, s in before.items() if s == [1, 2]]

    # resumed, then Ctrl-C as soon as another trial has ended an epoch
    ended = sum(map(len, epoch_ends(tmp_path).values()))
    with open(tmp_path / "second.log", "w") as log:
        second = subprocess.Popen([*args, "--resume"], cwd=tmp_path, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and second.poll() is None and sum(map(len, epoch_ends(tmp_path).values())) == ended:
            time.sleep(0.5)
        assert second.poll() is None, (tmp_path / "second.log").read_text()[-3000:]
        os.killpg(second.pid, signal.SIGINT)
        rc = second.wait(timeout=300)
    out = (tmp_path / "second.log").read_text()
    assert rc == 130, out[-3000:]
    assert "resuming study smoke-" in out
    assert "interrupted: study smoke-" in out and "nothing was exported or registered" in out
    study = out.split("--resume ")[-1].split()[0]
    assert f"continue it with: python tune.py --config {REPO / 'experiments' / 'smoke.yaml'}" in out
    assert "Traceback" not in out.split("interrupted: study")[-1]
    assert not list((tmp_path / "out").glob("*/best_student")) and not list((tmp_path / "out").glob("*/best.json"))
    c, parents, children = study_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [p.info.status for p in parents] == ["KILLED"] and parents[0].data.tags["tune_status"] == "INTERRUPTED"
    status = {ch.data.tags[tracking.TRIAL_TAG]: ch.info.status for ch in children}
    assert {status[t] for t in finished_before} == {"FINISHED"}  # what Tune had finished stays finished
    assert "KILLED" in {s for t, s in status.items() if t not in finished_before}
    assert not c.search_model_versions("name='tmad_ray_student'")

    third = subprocess.run([*args, "--resume", study], cwd=tmp_path, env=env(), capture_output=True, text=True,
                           timeout=900)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "clips     0 videos decoded, 16 reused, 0 bad" in third.stdout  # decoded once for the study
    parent, children = check_study(tmp_path, n_trials=3, epochs=2)
    after = epoch_ends(tmp_path)
    assert len(after) == 3
    for trial, ends in after.items():
        # every epoch ended; at most the one epoch that Ctrl-C cut (before its report) ended twice
        assert sorted(set(ends)) == [1, 2] and len(ends) <= 3, f"trial {trial} ended epochs {ends}"
    assert finished_before and all(epoch_starts(tmp_path)[t] == [1, 2] for t in finished_before)


def test_sigterm_ends_a_study_as_ctrl_c_does_killed_and_resumable(synth_root, smoke_zoo, tmp_path):
    """What `ray job stop`, Kubernetes and Slurm send: to the driver alone, during the first epochs."""
    args = [sys.executable, str(REPO / "tune.py"), "--config", str(REPO / "experiments" / "smoke.yaml"),
            *study_overrides(tmp_path, synth_root, smoke_zoo, "search.num_samples=2", "train.epochs=3")]
    with open(tmp_path / "run.log", "w") as log:
        run = subprocess.Popen(args, cwd=tmp_path, env=env(), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and run.poll() is None and not any(epoch_ends(tmp_path).values()):
            time.sleep(0.5)
        assert run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        run.send_signal(signal.SIGTERM)
        rc = run.wait(timeout=300)
    out = (tmp_path / "run.log").read_text()
    assert rc == 130 and "interrupted: study smoke-" in out and "continue it with: python tune.py" in out, out[-3000:]
    assert "Traceback" not in out and "*** SIGTERM received" not in out
    c, parents, children = study_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [p.info.status for p in parents] == ["KILLED"]
    assert "RUNNING" not in {ch.info.status for ch in children}
    assert not list((tmp_path / "ray").glob("smoke-*/tmad_study.lock"))  # released: a resume may start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_head(temp_dir: str) -> None:
    """Stop only the Ray processes of this head (``ray stop`` would stop every Ray on the machine)."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()


@pytest.fixture(scope="module")
def submitted_study(synth_root, smoke_zoo, pretrained_student, tmp_path_factory):
    """The smoke study (2 trials x 2 epochs) submitted with `ray job submit` to a `ray start --head`
    on this machine; returns (its folder, the job's output). Shared by the tests that read the study."""
    tmp_path = tmp_path_factory.mktemp("submitted")
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    gcs, dash = free_port(), free_port()
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--num-cpus", "4", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dash), "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env(RAY_ADDRESS=""), capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        # What the study writes is given relative, as a user would: Ray runs the job in its own temporary
        # copy of the working directory, so those paths must land under $TMAD_RAY_HOME (here tmp_path).
        runtime_env = json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
                                               "TMAD_RAY_HOME": str(tmp_path)}})
        relative = ["storage.clip_cache=clips", "storage.output_dir=out", "storage.ray_results=ray",
                    "tracking.tracking_uri=sqlite:///mlflow.db"]
        for _ in range(6):
            submit = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir",
                 str(REPO), "--runtime-env-json", runtime_env, "--", "python", "tune.py", "--config",
                 "experiments/smoke.yaml", *study_overrides(tmp_path, synth_root, smoke_zoo, *pretrained_student),
                 *relative],
                env=env(RAY_ADDRESS=""), capture_output=True, text=True, timeout=900)
            out = submit.stdout + submit.stderr
            if "No available agent to submit job" not in out:
                break
            time.sleep(10)  # the head's job agent is still starting (Ray says: try again later)
    finally:
        stop_head(temp_dir)
    return tmp_path, submit.returncode, out


def test_ray_job_submit_runs_the_smoke_study_on_a_local_head(submitted_study, synth_root):
    tmp_path, rc, out = submitted_study
    assert rc == 0 and "succeeded" in out, out[-5000:]
    assert "best student:" in out and "mlflow ui --backend-store-uri" in out
    assert "Started a local Ray instance" not in out  # it attached to the head
    assert f"outputs   {tmp_path / 'out'}; checkpoints {tmp_path / 'ray'}" in out
    assert f"relative paths of what the study writes are under {tmp_path}, $TMAD_RAY_HOME" in out
    assert any((tmp_path / "clips").iterdir())
    assert "workflowType=machine_learning" in out and "models:/tmad_ray_student@champion" in out
    # what the user watches: Tune's table with the metric, the best so far and the recipe; no library noise
    assert "best so far" in out and "| layers" in out
    assert "Current best trial:" in out and "best_val_accuracy=" in out
    for noise in ("PreemptionWatcher", "A run snapshot was found", "ExperimentalWarning", "Loading weights",
                  "Downloading artifacts", "Successfully registered model", "INFO mlflow", "(RayTrainWorker"):
        assert noise not in out, noise
    check_study(tmp_path, n_trials=2, epochs=2, root=synth_root)


def test_the_mlflow_ui_shows_the_study_in_a_browser(submitted_study):
    """`mlflow server` over the finished study, read in headless Chromium: the runs view lists the
    study with its trials nested and named by recipe, a trial's page charts val_accuracy over epochs,
    the compare page plots the recipe against the best score, the registered version shows the recipe.
    Screenshots land in $TMAD_RAY_SCREENSHOTS when it is set (the README's pictures)."""
    from mlflow_browser import (browser, close_assistant, compare_url, expand_parents, mlflow_server, runs_url,
                                search_charts, wait_for_text)

    tmp_path, rc, _ = submitted_study
    assert rc == 0
    c, parents, children = study_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp, study = parents[0].info.experiment_id, parents[0].info.run_name
    shots = Path(os.environ["TMAD_RAY_SCREENSHOTS"]) if os.environ.get("TMAD_RAY_SCREENSHOTS") else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    names = [ch.info.run_name for ch in children]
    with mlflow_server(tmp_path) as url, browser() as d:
        d.get(runs_url(url, exp))  # the link tune.py prints, without its sort
        wait_for_text(d, study[:16])
        close_assistant(d)
        expand_parents(d)
        body = wait_for_text(d, *(n[:12] for n in names))  # the trials, nested under the study
        assert "GenAI apps" not in body
        d.get(runs_url(url, exp) + "&orderByKey=metrics.%60best_val_accuracy%60&orderByAsc=false")
        wait_for_text(d, "Sort: best_val_accuracy", *(n[:12] for n in names))
        close_assistant(d)
        d.save_screenshot(str(shots / "mlflow_runs.png"))

        best = max(children, key=lambda ch: ch.data.metrics["best_val_accuracy"])
        d.get(f"{url}/#/experiments/{exp}/runs/{best.info.run_id}/model-metrics?workflowType=machine_learning")
        wait_for_text(d, best.info.run_name[:12], "Model metrics")
        close_assistant(d)
        search_charts(d, "val_accuracy")  # the charts render lazily: filter to the ones asked for
        wait_for_text(d, "best_val_accuracy", "(val_accuracy)", "(best_val_accuracy)")
        d.save_screenshot(str(shots / "mlflow_trial.png"))

        d.get(compare_url(url, exp, [ch.info.run_id for ch in children]))
        body = wait_for_text(d, "Parallel Coordinates Plot", "best_val_accuracy", "align_layers", "alpha")
        assert "[-1" in body  # the layer sets as categories, every trial plotted
        time.sleep(2)
        d.save_screenshot(str(shots / "mlflow_compare.png"))

        d.get(f"{url}/#/models/tmad_ray_student/versions/1?workflowType=machine_learning")
        body = wait_for_text(d, "champion", "alpha", "temperature", "align_layers", "test_accuracy", "Schema")
        assert best.info.run_name[:12] in body or "Source Run" in body
        close_assistant(d)
        d.save_screenshot(str(shots / "mlflow_model_version.png"))


def test_nsga2_search_over_student_depth_gives_a_pareto_front(synth_root, smoke_zoo, tmp_path, ray_local, capsys,
                                                              monkeypatch):
    from tmad_ray.cli import main

    monkeypatch.chdir(tmp_path)  # MLflow puts a new experiment's artifacts under ./mlruns

    rc = main(["tune", "--config", str(REPO / "experiments" / "smoke.yaml"),
               *study_overrides(tmp_path, synth_root, smoke_zoo, "search.num_samples=3", "train.epochs=1",
                                "search.objectives=[val_accuracy,student_latency_ms]", "search.algorithm=nsga2",
                                "search.student_depths=[1,2]", 'search.align_layer_sets=["-1"]')])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "Pareto front:" in out and "| trial | val_accuracy | student_latency_ms | student depth |" in out
    c, parents, children = study_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(children) == 3 and all("student_latency_ms" in ch.data.metrics for ch in children)
    assert {"pareto.md", "pareto.png"} <= {a.path for a in c.list_artifacts(parents[0].info.run_id)}


def test_a_study_confirms_its_best_recipes_on_more_seeds_and_exports_the_best_mean(synth_root, smoke_zoo, tmp_path,
                                                                                   ray_local, capsys, monkeypatch):
    from statistics import mean

    from tmad_ray.cli import main
    from tmad_ray.search.confirm import CONFIRM_TAG, CONFIRMS_TAG

    monkeypatch.chdir(tmp_path)
    rc = main(["tune", "--config", str(REPO / "experiments" / "smoke.yaml"),
               *study_overrides(tmp_path, synth_root, smoke_zoo, "search.num_samples=2", "train.epochs=1",
                                "search.confirm_top_k=2", "search.confirm_seeds=1")])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "confirming the 2 best recipes on 1 more training seed(s) each (2 runs" in out
    assert "mean over seeds" in out and "over 2 training seeds" in out
    best = json.loads(next((tmp_path / "out").glob("*/best.json")).read_text())
    assert len(best["val_accuracy_runs"]) == 2 and best["val_accuracy_mean"] == pytest.approx(mean(best["val_accuracy_runs"]))
    c, parents, children = study_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    confirms = [ch for ch in children if CONFIRM_TAG in ch.data.tags]
    assert len(children) == 4 and len(confirms) == 2 and all(ch.info.status == "FINISHED" for ch in children)
    assert {ch.data.params["seed"] for ch in confirms} == {"1000"}
    trial_runs = {ch.data.tags[tracking.TRIAL_TAG]: ch for ch in children if tracking.TRIAL_TAG in ch.data.tags}
    assert sorted(ch.data.tags[CONFIRMS_TAG] for ch in confirms) == sorted(trial_runs)  # one run per trial
    assert all(len(c.get_metric_history(ch.info.run_id, "val_accuracy")) == 1 for ch in confirms)  # rank 0 logged
    # the winner by mean, among the two confirmed recipes; its best run exported and registered from that run
    other = [ch for ch in confirms if ch.data.tags[CONFIRMS_TAG] != best["trial"]][0]
    other_mean = mean([trial_runs[other.data.tags[CONFIRMS_TAG]].data.metrics["best_val_accuracy"],
                       other.data.metrics["best_val_accuracy"]])
    assert best["val_accuracy_mean"] >= other_mean
    runs = {**{t: ch.info.run_id for t, ch in trial_runs.items()}, **{ch.data.tags[CONFIRM_TAG]: ch.info.run_id
                                                                      for ch in confirms}}
    assert best["exported_run"] in runs
    version = c.get_model_version_by_alias("tmad_ray_student", "champion")
    assert version.run_id == runs[best["exported_run"]]
    # the study is finished and unlocked: resuming it changes nothing; other settings are refused
    study_dir = next((tmp_path / "ray").glob("smoke-*"))
    assert not (study_dir / "tmad_study.lock").exists()
    again = study_overrides(tmp_path, synth_root, smoke_zoo, "search.num_samples=2", "train.epochs=1",
                            "search.confirm_top_k=2", "search.confirm_seeds=1")
    assert main(["tune", "--config", str(REPO / "experiments" / "smoke.yaml"), *again, "--resume"]) == 0
    assert f"study {study_dir.name} has finished (" in capsys.readouterr().out
    assert c.get_run(parents[0].info.run_id).info.status == "FINISHED"
    assert main(["tune", "--config", str(REPO / "experiments" / "smoke.yaml"), *again, "train.epochs=3",
                 "--resume"]) == 2
    err = capsys.readouterr().err
    assert "was started with other settings than this command line's: train.epochs: study 1, command line 3" in err


def test_trials_whose_loss_is_not_finite_are_never_best_and_the_study_fails(synth_root, smoke_zoo, tmp_path,
                                                                             ray_local, capsys, monkeypatch):
    from tmad_ray.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["tune", "--config", str(REPO / "experiments" / "smoke.yaml"),
               *study_overrides(tmp_path, synth_root, smoke_zoo, "search.num_samples=2", "train.epochs=3",
                                "search.lr=[1e29, 1e30]", "train.warmup_ratio=0", "train.grad_clip=null")])
    out, err = capsys.readouterr()
    assert rc == 1 and "no trial reported a result" in err, out[-3000:]
    assert out.count("| NON-FINITE LOSS (epoch ") == 2, out[-3000:]
    c, parents, children = study_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert parents[0].info.status == "FAILED" and [ch.info.status for ch in children] == ["FAILED", "FAILED"]
    assert all("not finite" in ch.data.tags["non_finite_loss"] for ch in children)
    assert not list((tmp_path / "out").glob("*/best_student")) and not c.search_model_versions("name='tmad_ray_student'")
