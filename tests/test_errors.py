"""Every failure a user can act on is one line, `error: ...`, exit 2 (1 for a failed download or
service); a traceback only with --debug or TMAD_RAY_DEBUG=1. Secrets never reach MLflow or the screen."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tmad_ray.cli import main
from tmad_ray.config import ConfigError, load_config
from tmad_ray.models.hf import ModelError, load_teacher

REPO = Path(__file__).resolve().parent.parent


def one_line_error(capsys, argv, code=2, **env):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        rc = main(argv)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    err = capsys.readouterr().err
    assert rc == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("text, words", [
    ("train:\n  epochs: [1\n", "not valid YAML"),          # an unclosed bracket
    ("name: caf\xe9\n", "not UTF-8 text"),                  # Latin-1 bytes
])
def test_config_files_that_do_not_parse(tmp_path, capsys, text, words):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(text.encode("latin-1"))
    line = one_line_error(capsys, ["data", "cache", "--config", str(bad)])
    assert words in line and str(bad) in line


def test_an_override_that_does_not_parse(capsys):
    line = one_line_error(capsys, ["data", "cache", "train.epochs=[1"])
    assert "override 'train.epochs=[1'" in line and "not valid YAML" in line


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [\n")
    with pytest.raises(ConfigError):
        main(["data", "cache", "--config", str(bad), "--debug"])
    with pytest.raises(ConfigError):
        os.environ["TMAD_RAY_DEBUG"] = "1"
        try:
            main(["data", "cache", "--config", str(bad)])
        finally:
            del os.environ["TMAD_RAY_DEBUG"]


@pytest.mark.parametrize("content, words", [(b"", "is empty"), (None, "truncated"), (b"not a checkpoint", "cannot read")])
def test_convert_amd_on_a_broken_checkpoint(tmp_path, capsys, content, words):
    ckpt = tmp_path / "a.pth"
    if content is None:  # a real torch.save file cut in half
        torch.save({"module": {"w": torch.zeros(1000)}}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    else:
        ckpt.write_bytes(content)
    line = one_line_error(capsys, ["convert-amd", str(ckpt), str(tmp_path / "out"), "--arch", "vit-s"])
    assert words in line and str(ckpt) in line


def test_a_teacher_directory_with_broken_or_missing_weights(tmp_path):
    from transformers import VideoMAEConfig, VideoMAEModel

    d = tmp_path / "teacher"
    VideoMAEModel(VideoMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=16, num_frames=4)).save_pretrained(d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match="cannot load model .*write it again with save_pretrained") as e:
        load_teacher(str(d))
    assert "hf download" not in str(e.value) and "\n" not in str(e.value)
    weights.unlink()
    with pytest.raises(ModelError, match="local directory") as e:
        load_teacher(str(d))
    assert "hf download" not in str(e.value)


def test_a_dead_tracking_server_is_found_first_in_seconds(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled",
           "MLFLOW_TRACKING_URI": "http://user:s3cret@127.0.0.1:1"}
    t0 = time.time()
    r = subprocess.run([sys.executable, str(REPO / "tune.py"), "--config", str(REPO / "experiments" / "smoke.yaml")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    took = time.time() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach the MLflow tracking server http://***@127.0.0.1:1" in lines[0], lines
    assert "s3cret" not in r.stderr + r.stdout
    assert took < 60 and not (tmp_path / "data").exists()  # before any preparation (import time included)


def test_secrets_are_redacted_everywhere_they_could_leave(tmp_path):
    from tmad_ray import tracking
    from tmad_ray.search.mlflow_runs import log_study_start
    from tmad_ray.search.results import mlflow_ui_command

    uri = "https://alice:hunter2@mlflow.example.com/?token=abc"
    assert tracking.redact(uri) == "https://***@mlflow.example.com/?token=***"
    assert mlflow_ui_command(uri) == "open https://***@mlflow.example.com/?token=*** in a browser"
    assert tracking.redact_params({"x.password": "p", "y.api_key": "k", "z": "s3://k:s@b/c"}) == \
        {"x.password": "***", "y.api_key": "***", "z": "s3://***@b/c"}
    cfg = load_config(None, [f"tracking.tracking_uri={uri}"])
    client = tracking.client(f"sqlite:///{tmp_path / 'm.db'}")
    run = client.create_run(tracking.experiment_id(client, "t")).info.run_id
    log_study_start(client, run, cfg)
    params = client.get_run(run).data.params
    assert not any("hunter2" in v or "abc" == v for v in params.values())
    config = Path(client.download_artifacts(run, "config.yaml", str(tmp_path))).read_text()
    assert "tracking_uri: https://***@mlflow.example.com/?token=***" in config and "hunter2" not in config


def test_the_plan_names_the_tracking_uri_actually_used(monkeypatch):
    from types import SimpleNamespace

    from tmad_ray.study import search_plan

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:pw@tracking.internal:5000")
    cfg = load_config(None)  # the config does not set tracking.tracking_uri: the environment wins
    plan = search_plan(cfg, SimpleNamespace(root="r", rows={"train": []}, labels=[]),
                       SimpleNamespace(decoded=0, reused=0, bad=[], cache="c"))
    assert "tracking  http://***@tracking.internal:5000" in plan and "pw" not in plan


def ray_wrapped(cause: BaseException):
    """``cause`` as a Ray Train run reports a worker's failure: a Train ``WorkerGroupError`` over a
    ``RayTaskError`` over the exception the worker raised."""
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    task = RayTaskError("RayTrainWorker.run_train_fn", "Traceback (most recent call last): ...", cause)
    return WorkerGroupError("Training failed due to worker errors:", {1: task, 0: task})


def test_the_cause_of_a_workers_failure_reaches_the_user_in_one_line(capsys):
    from tmad_ray.cli import print_error

    try:
        raise ray_wrapped(KeyError("crc32"))
    except Exception as e:  # noqa: BLE001
        rc = print_error(e)
    err = capsys.readouterr().err
    first, second = err.strip().splitlines()
    assert rc == 1 and first == "error: KeyError: 'crc32' (WorkerGroupError)", err
    log = Path(second.split("the whole traceback: ")[1].split(" (or")[0])
    text = log.read_text()
    assert text.startswith("Traceback") and "WorkerGroupError" in text and "caused by KeyError:" in text


def test_a_users_problem_raised_in_a_worker_is_still_the_users_problem(capsys):
    from tmad_ray.cli import print_error
    from tmad_ray.data.loader import LoaderError

    rc = print_error(ray_wrapped(LoaderError("3 train videos for 4 workers: lower train.num_workers")))
    assert rc == 2 and capsys.readouterr().err == "error: 3 train videos for 4 workers: lower train.num_workers\n"


@pytest.mark.parametrize("code, words", [(28, "the volume is full (or over quota)"), (30, "the volume is read-only")])
def test_a_full_or_read_only_volume_names_the_path_and_its_free_space(tmp_path, capsys, code, words):
    from tmad_ray.cli import print_error

    path = tmp_path / "ray" / "checkpoint_000003" / "state.pt"
    rc = print_error(ray_wrapped(OSError(code, os.strerror(code), str(path))))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: cannot write {path}: {words}, ") and " GiB free there" in err, err
    assert "storage.*" in err and len(err.strip().splitlines()) == 1
