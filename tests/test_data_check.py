"""`tmad-ray data check` and `data cache` on a dataset with exactly five known problems."""

import json
import os
import subprocess
import sys

import pytest

from conftest import smoke_config
from tmad_ray.data.check import check_dataset


def damage(root):
    """Add the five problems of the issue to a good dataset; returns (path, reason word) expected."""
    videos = root / "videos"
    good = sorted(videos.glob("*.mp4"))
    data = good[0].read_bytes()
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (videos / "empty.mp4").write_bytes(b"")
    with open(root / "train.csv", "a") as f:
        f.write("videos/truncated.mp4 A\n")  # line 9
        f.write("videos/empty.mp4 B1\n")  # line 10
        f.write("videos/missing.mp4 G\n")  # line 11
        f.write("videos/A_0000.mp4\n")  # line 12: malformed
    with open(root / "val.csv", "a") as f:
        f.write("videos/A_0001.mp4 Z9\n")  # line 5: label unknown to train
    return {
        ("videos/truncated.mp4", "train.csv", 9, "truncated"),
        ("videos/empty.mp4", "train.csv", 10, "zero-byte"),
        ("videos/missing.mp4", "train.csv", 11, "missing video"),
        ("train.csv", "train.csv", 12, "malformed"),
        ("videos/A_0001.mp4", "val.csv", 5, "not in train's labels"),
    }


def matches(problems, expected):
    got = {(p["path"], p["file"], p["line"]) for p in problems}
    assert got == {e[:3] for e in expected}, problems
    for path, _, _, word in expected:
        (reason,) = [p["reason"] for p in problems if p["path"] == path]
        assert word in reason, (path, reason)


def test_exactly_the_five_problems(dataset_copy):
    expected = damage(dataset_copy)
    report = check_dataset(str(dataset_copy), max_bad_fraction=0.5)
    matches(report.as_dict()["problems"], expected)
    assert report.videos == 16 + 5 and report.ok
    assert not check_dataset(str(dataset_copy), max_bad_fraction=0.1).ok


def test_outside_paths_are_reported_never_probed_and_empty_classes_named(dataset_copy, monkeypatch):
    opened = []
    import tmad_ray.data.check as check

    real_probe = check._probe_all
    monkeypatch.setattr(check, "_probe_all", lambda paths, *a: opened.extend(paths) or real_probe(paths, *a))
    (dataset_copy.parent / "outside.mp4").write_bytes((dataset_copy / "videos" / "A_0002.mp4").read_bytes())
    with open(dataset_copy / "train.csv", "a") as f:
        f.write("../outside.mp4 A\n/etc/passwd A\n../../../../etc/passwd B1\nvideos/missing.mp4 Q\n")
    report = check_dataset(str(dataset_copy), max_bad_fraction=0.5)
    outside = [p for p in report.problems if "outside the data root" in p.reason]
    assert [p.path for p in outside] == ["../outside.mp4", "/etc/passwd", "../../../../etc/passwd"]
    root = os.path.realpath(dataset_copy)
    assert opened and all(os.path.realpath(o).startswith(root + os.sep) for o in opened)  # the decoder never saw them
    assert report.empty_classes == ["Q"] and "without a usable train video" in report.summary()
    assert report.as_dict()["empty_classes"] == ["Q"]


def test_good_dataset_has_no_problem(synth_root):
    report = check_dataset(str(synth_root))
    assert report.ok and report.problems == [] and report.videos == 16


def test_cli_json_and_exit_status(dataset_copy):
    expected = damage(dataset_copy)
    cmd = [sys.executable, "-m", "tmad_ray", "data", "check", str(dataset_copy), "--json"]
    strict = subprocess.run(cmd, capture_output=True, text=True)
    assert strict.returncode == 1, strict.stderr  # 5 of 21 > default max_bad_fraction 0.05
    out = json.loads(strict.stdout)
    assert out["ok"] is False
    matches(out["problems"], expected)
    lenient = subprocess.run(cmd + ["data.max_bad_fraction=0.5"], capture_output=True, text=True)
    assert lenient.returncode == 0 and json.loads(lenient.stdout)["ok"] is True
    human = subprocess.run(cmd[:-1], capture_output=True, text=True)
    assert "FAIL" in human.stdout and "train.csv:12" in human.stdout


@pytest.mark.integration
def test_data_cache_completes_for_the_good_videos(dataset_copy, tmp_path, ray_local):
    from tmad_ray.study import prepare_data
    from tmad_ray.data.pipeline import DataError, check_bad_fraction

    expected = damage(dataset_copy)
    cfg = smoke_config(tmp_path, dataset_copy)
    manifest, report = prepare_data(cfg, quiet=True)
    d = report.as_dict()
    # All 16 good videos were decoded; the five problems are in the report, not a crash.
    assert (d["decoded"], d["reused"], d["videos"]) == (16, 0, 21)
    assert sum(len(v) for v in report.entries.values()) == 16
    matches(d["bad_videos"], expected)
    saved = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert saved["bad"] == 5
    with pytest.raises(DataError, match="5 of 21 videos are unusable"):
        check_bad_fraction(report, cfg.data.max_bad_fraction)  # smoke allows 0.2
    # Known-bad videos are not decoded again: their verdict is in the cache.
    _, again = prepare_data(cfg, quiet=True)
    assert (again.decoded, again.reused, len(again.bad)) == (0, 16, 5)
