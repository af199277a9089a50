"""The registered student is an MLflow model: it loads with mlflow.pyfunc, classifies videos given as
paths, says what it is on its registry page, and `mlflow models serve` answers on loopback."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from conftest import smoke_config
from tmad_ray import tracking

BIN = Path(sys.executable).parent
RECIPE = {"alpha": 1.5, "beta": 0.5, "gamma": 0.1, "delta": 0.3, "temperature": 3.0, "align_layers": "-1"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory, synth_root):
    """A tiny exported student registered twice (two studies) from trial runs, as a study's end does."""
    from tmad_ray.data.manifest import load_manifest
    from tmad_ray.models.hf import build_student
    from tmad_ray.search.mlflow_runs import register_student
    from tmad_ray.train.export import export_student

    tmp = tmp_path_factory.mktemp("registry")
    cwd = os.getcwd()
    os.chdir(tmp)  # MLflow puts a new experiment's artifacts under ./mlruns
    try:
        uri = f"sqlite:///{tmp}/mlflow.db"
        cfg = smoke_config(tmp, synth_root, f"tracking.tracking_uri={uri}")
        manifest = load_manifest(synth_root, cfg.data.label_mode)
        student = build_student(cfg.models.student, cfg.data, list(manifest.labels))
        student_dir = export_student(student, cfg.data, tmp / "out" / "best_student")
        client = tracking.client(uri)
        exp = tracking.experiment_id(client, cfg.tracking.experiment)
        runs, versions = [], []
        for study in ("s-1", "s-2"):
            parent = tracking.open_parent(client, exp, study)
            best = {"trial": "t0", "trial_number": 0, **RECIPE, "val_accuracy": 0.5, "epochs": 2}
            child = tracking.open_child(client, exp, parent, study, "t0", tracking.trial_run_name(best))
            versions.append(register_student(client, cfg, uri, study, best, child, student_dir, manifest))
            runs.append(child)
    finally:
        os.chdir(cwd)
    return {"uri": uri, "client": client, "runs": runs, "versions": versions, "manifest": manifest, "root": synth_root,
            "name": cfg.tracking.registered_model, "tmp": tmp}


def videos(reg, split="test", n=2):
    m = reg["manifest"]
    return [m.rows[split][i].abspath(m.root) for i in range(n)]


def test_the_registered_version_says_what_it_is(registry):
    client, name = registry["client"], registry["name"]
    assert registry["versions"] == [1, 2]
    v = client.get_model_version(name, "2")
    assert v.run_id == registry["runs"][1]  # the trial that trained it, not the study
    tags = v.tags
    assert {k: tags[k] for k in ("alpha", "beta", "gamma", "delta", "temperature")} == \
        {"alpha": "1.5", "beta": "0.5", "gamma": "0.1", "delta": "0.3", "temperature": "3"}
    assert tags["align_layers"] == "[-1]" and tags["lr"] and tags["trial"] == "#0 (t0)" and tags["study"] == "s-2"
    assert json.loads(tags["labels"]) == ["A", "B1", "B2", "G"]
    assert tags["teacher"].endswith("teacher") or tags["teacher"] == "MCG-NJU/videomae-base"
    assert 0.0 <= float(tags["test_accuracy"]) <= 1.0 and 0.0 <= float(tags["test_macro_f1"]) <= 1.0
    assert tags["test_videos"] == "4"
    assert "Best student of study `s-2`" in v.description and "test_accuracy" in v.description
    # the alias follows the newest study's best
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    model = client.get_logged_model(v.source.removeprefix("models:/"))  # the version's MLflow model: its metrics
    assert {m.key for m in model.metrics} >= {"test_accuracy", "test_macro_f1"}


def test_pyfunc_classifies_paths_and_a_dataframe_of_paths(registry, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{registry['name']}@champion")
    assert model.metadata.signature.inputs.to_dict() == [{"type": "string", "required": True}]
    paths = videos(registry)
    out = model.predict(paths)
    assert list(out["path"]) == paths and set(out["label"]) <= {"A", "B1", "B2", "G"}
    probs = json.loads(out["probabilities"][0])
    assert abs(sum(probs.values()) - 1) < 1e-3 and out["score"][0] == pytest.approx(max(probs.values()), abs=1e-5)
    again = model.predict(pd.DataFrame({"path": [paths[0], "/nowhere/missing.mp4"]}))
    assert again["label"][0] == out["label"][0] and again["score"][0] == pytest.approx(out["score"][0], abs=1e-6)
    assert pd.isna(again["label"][1]) and "no such file" in again["error"][1]  # one bad video, not a failed batch
    # logged "from code": no pickled Python object travels with the model
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{registry['name']}/1"))
    assert not list(local.rglob("*.pkl")) and (local / "code" / "tmad_ray" / "serving.py").is_file()


def data_uri(path, mime="video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def test_served_the_model_reads_paths_only_under_the_operators_roots_and_takes_bytes(registry, monkeypatch, tmp_path):
    import mlflow

    from tmad_ray import serving

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{registry['name']}@champion")
    good = videos(registry, n=1)[0]
    own = model.predict([good])  # in the user's own process: any path, as before
    assert own["error"][0] is None and own["label"][0] in {"A", "B1", "B2", "G"}
    monkeypatch.setenv(serving.SERVED_ENV, "true")  # what `mlflow models serve` sets
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "v.mp4").write_bytes(Path(good).read_bytes())
    (root / "escape.mp4").symlink_to("/etc/hostname")
    hls = "data:application/vnd.apple.mpegurl;base64," + base64.b64encode(
        b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n").decode()
    truncated = "data:video/mp4;base64," + base64.b64encode(Path(good).read_bytes()[:600]).decode()
    # no roots configured: every path refused with one message, whether it exists or not
    out = model.predict([good, "/etc/shadow", "/nowhere/missing.mp4", str(root / "escape.mp4")])
    assert list(out["error"]) == [serving.REFUSED] * 4 and out["label"].isna().all()
    monkeypatch.setenv(serving.SERVE_ROOTS_ENV, str(root))
    out = model.predict([str(root / "v.mp4"), good, "/etc/shadow", str(root / "escape.mp4"), str(root / "../x"),
                         data_uri(good), hls, truncated, "data:video/mp4;base64,@@@"])
    assert out["label"][0] == own["label"][0] and out["score"][0] == pytest.approx(own["score"][0], abs=1e-6)
    assert list(out["error"][1:5]) == [serving.REFUSED] * 4  # outside, missing, a symlink out, ..
    assert out["label"][5] == own["label"][0] and out["path"][5].startswith("data:video/mp4;base64 (")
    assert "not a video container" in out["error"][6]
    assert out["error"][7] and "/" not in out["error"][7] and "tmad-serve" not in out["error"][7]
    assert "not valid base64" in out["error"][8]
    assert out["score"][1] is None  # null in the server's JSON, not NaN


@pytest.mark.integration
def test_mlflow_models_serve_answers_on_loopback(registry):
    from mlflow_browser import free_port

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"], "PATH": f"{BIN}:{os.environ['PATH']}",
           "TMAD_RAY_SERVE_ROOTS": str(registry["root"])}
    log = open(registry["tmp"] / "serve.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{registry['name']}@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, (registry["tmp"] / "serve.log").read_text()[-3000:]
                time.sleep(1)
        paths = videos(registry)

        def post(body: dict) -> list[dict]:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            text = urllib.request.urlopen(req, timeout=60).read()
            return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the server's JSON"))["predictions"]

        listed = post({"inputs": paths})
        records = post({"dataframe_records": [{"path": p} for p in paths]})
        assert [r["path"] for r in listed] == paths and [r["label"] for r in listed] == [r["label"] for r in records]
        assert all(r["label"] in {"A", "B1", "B2", "G"} and r["error"] is None for r in listed)
        # the bytes instead of a path; paths outside TMAD_RAY_SERVE_ROOTS refused alike, existing or not
        mixed = post({"inputs": [data_uri(paths[0]), "/etc/shadow", "/nowhere/missing.mp4", paths[1]]})
        assert mixed[0]["label"] == listed[0]["label"] and mixed[3]["label"] == listed[1]["label"]
        assert mixed[1]["error"] == mixed[2]["error"] and "not read by this server" in mixed[1]["error"]
        assert mixed[1]["score"] is None and mixed[1]["label"] is None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
