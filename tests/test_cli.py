"""The commands as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import smoke_config

REPO = Path(__file__).resolve().parent.parent


def run(*args, cwd=REPO, **env):
    # RAY_ADDRESS=local: a bare ray.init() in the command starts its own Ray, never the tests'.
    full_env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", **env}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=600)


def test_synth_via_python_m(tmp_path):
    out = tmp_path / "ds"
    r = run("-m", "tmad_ray", "synth", str(out), "--videos-per-class", "3", "--size", "32x48", "--frames", "16")
    assert r.returncode == 0, r.stderr
    assert "wrote 12 videos (32x48, 16 frames" in r.stdout
    assert len(list((out / "videos").glob("*.mp4"))) == 12
    assert sorted(p.name for p in out.glob("*.csv")) == ["test.csv", "train.csv", "val.csv"]


def test_config_errors_stop_before_anything_runs(tmp_path):
    r = run(str(REPO / "tune.py"), "data.nmu_frames=8", "train.epochs=0", cwd=tmp_path)
    assert r.returncode == 2
    assert "data.nmu_frames: unknown key" in r.stderr and "train.epochs" in r.stderr
    assert not (tmp_path / "data").exists()  # nothing was generated


@pytest.mark.integration
def test_tune_py_builds_what_is_missing_and_searches(tmp_path, ray_local):
    """From nothing: the dataset and the toy zoo are made in the working directory, then two trials run,
    one after the other, beside another Ray on the machine (this module's). With two Rays, Ray Train's
    placement-group cleaner must still find its own cluster; otherwise the trial Tune stops at max_t
    keeps its CPUs and the next trial waits forever."""
    args = [str(REPO / "tune.py"), "--config", str(REPO / "experiments" / "smoke.yaml"), f"data.root={tmp_path / 'ds'}",
            f"storage.clip_cache={tmp_path / 'clips'}", f"storage.output_dir={tmp_path / 'out'}",
            f"storage.ray_results={tmp_path / 'ray'}", "search.num_samples=2", "train.epochs=1"]
    first = run(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("| COMPLETED |") == 2
    assert "clips     16 videos decoded, 0 reused, 0 bad" in first.stdout
    assert "search    2 trials, TPE" in first.stdout
    # The toy zoo was trained into the working directory and every model came through its loader.
    assert (tmp_path / "zoo_smoke" / "zoo.json").is_file()
    assert "teacher   VideoMAEForVideoClassification: 4 blocks x 128 wide" in first.stdout
    assert "assistant VideoMAEForVideoClassification: 4 blocks x 96 wide, 3 heads" in first.stdout
    assert "student   VideoMAEForVideoClassification: 2 blocks x 32 wide, 2 heads" in first.stdout
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert (report["videos"], report["decoded"], report["bad"]) == (16, 16, 0)
    assert "| trial | alpha | beta | gamma | delta | T | layers | best val_accuracy | epochs | status |" in first.stdout
    assert "best student: " in first.stdout and f"sqlite:///{tmp_path}/mlflow.db" in first.stdout
    assert "trial start-up (median of 2): " in first.stdout and " s Ray Train start " in first.stdout


@pytest.mark.integration
def test_data_cache_json_is_clean_json(synth_root, tmp_path):
    r = run("-m", "tmad_ray", "data", "cache", "--config", str(REPO / "experiments" / "smoke.yaml"), "--json",
            f"data.root={synth_root}", "data.synthetic=null", f"storage.clip_cache={tmp_path / 'c'}",
            f"storage.output_dir={tmp_path / 'o'}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert (out["videos"], out["decoded"], out["clips_written"]) == (16, 16, 16)


@pytest.mark.integration
def test_bench_data_writes_consistent_json(synth_root, tmp_path, ray_local):
    from tmad_ray.bench.data import run_data_bench

    cfg = smoke_config(tmp_path, synth_root)
    out = tmp_path / "data.json"
    result = run_data_bench(cfg, out=str(out), videos_per_class=3, size="48x64", frames=16)
    assert json.loads(out.read_text()) == result
    assert result["clips"]["a"] == result["clips"]["b"] == result["clips"]["c"] == 4  # 4 train videos x 1 view
    assert all(v > 0 for v in result["clips_per_s"].values())
    assert set(result["speedup_vs_a"]) == {"b", "c"}


def test_every_command_s_help_renders():
    # argparse formats help strings with %: a stray "95 % CIs" broke `tmad-ray bench --help`
    import argparse

    from tmad_ray.cli import build_parser

    def walk(parser):
        parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield sub
                    yield from walk(sub)

    names = [p.prog for p in walk(build_parser())]
    assert "tmad-ray bench peer" in names and "tmad-ray bench quality" in names


def test_a_study_with_a_failed_trial_exits_non_zero_naming_it(capsys):
    from tmad_ray.cli import errored_trials

    rows = [{"trial": "a1", "trial_number": 0, "status": "COMPLETED"},
            {"trial": "b2", "trial_number": 1, "status": "ERROR", "error": "RuntimeError: checkpoint truncated"}]
    assert errored_trials(rows) == 1
    assert capsys.readouterr().err.startswith("error: trial #1 (b2) failed: RuntimeError: checkpoint truncated (")
    assert errored_trials(rows[:1]) == 0
