"""Ray Train runs as users start them: 2 CPU workers, a killed worker, the exported student.

The command-line test (its own Ray, in a subprocess) comes before the tests that share the
module's Ray: two local Rays at once confuse Ray Train (see ``conftest.ray_local``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import smoke_config
from tmad_ray.train.run import epoch_history
from tmad_ray.data.manifest import load_manifest
from tmad_ray.data.pipeline import fill_cache

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def prepared(tmp_path, root, zoo, *overrides):
    cfg = smoke_config(tmp_path, root, *zoo, *overrides)
    manifest = load_manifest(cfg.data.root)
    return cfg, manifest, fill_cache(manifest, cfg)


def run(*args, cwd=REPO):
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tmad_ray", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=900)


def test_train_command_then_eval_and_pipeline(synth_root, smoke_zoo, pretrained_student, tmp_path):
    """As users run it: a pretrained student fine-tuned with every term on (projectors, attention at two
    layers, the relational grid), 2 DDP workers, then the exported student evaluated and piped."""
    overrides = [f"data.root={synth_root}", "data.synthetic=null", f"storage.clip_cache={tmp_path / 'clips'}",
                 f"storage.output_dir={tmp_path / 'out'}", f"storage.ray_results={tmp_path / 'ray'}", *smoke_zoo,
                 *pretrained_student, "distill.align_layers=[-1,-2]"]
    r = run("train", "--config", str(REPO / "experiments" / "smoke.yaml"), "--name", "cli", *overrides)
    assert r.returncode == 0, r.stderr[-4000:]
    # the new head is said once, on the driver; the backbone came from the checkpoint
    assert r.stdout.count("new classifier + fc_norm for these labels") == 1, r.stdout[-3000:]
    assert "pretrained from" in r.stdout and "student" in r.stdout
    assert "epoch train_loss train_ce val_loss val_acc" in r.stdout
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 8]
    assert [row[0] for row in rows] == ["1", "2"]
    student = tmp_path / "out" / "cli" / "best_student"
    assert f"exported student: {student}" in r.stdout

    e = run("eval", str(student), "--data", str(synth_root), "--split", "test", "--json")
    assert e.returncode == 0, e.stderr[-3000:]
    res = json.loads(e.stdout)
    test_videos = len(load_manifest(synth_root).rows["test"])
    assert res["videos"] == test_videos and res["views"] == "1x1" and 0 <= res["accuracy"] <= 1
    assert sum(map(sum, res["confusion"])) == test_videos and Path(res["confusion_png"]).is_file()
    e3 = run("eval", str(student), "--data", str(synth_root), "--views", "2x3", "--out", str(tmp_path / "ev"))
    assert e3.returncode == 0 and "2x3 views each" in e3.stdout and (tmp_path / "ev" / "confusion.png").is_file()

    from transformers import pipeline

    clf = pipeline("video-classification", model=str(student))
    video = next((synth_root / "videos").glob("*.mp4"))
    pred = clf(str(video), frame_sampling_rate=2)
    assert {p["label"] for p in pred} == {"A", "B1", "B2", "G"}


@pytest.mark.parametrize("pool", [None, 3], ids=["views", "view-pool"])
def test_each_worker_trains_on_its_own_share(synth_root, smoke_zoo, tmp_path, ray_local, pool):
    """Also with α = 0 and grad_accum 2: DDP through Ray's prepare_model must allow the unused
    classifier, and the replicas must end identical. With a view pool the cache holds the pool and an
    epoch trains ``train_views`` of it per video."""
    from tmad_ray.data.cache import ClipCache
    from tmad_ray.train.run import fit

    cfg, manifest, report = prepared(tmp_path, synth_root, smoke_zoo, "train.epochs=1", "distill.alpha=0",
                                     "train.grad_accum=2", f"data.train_view_pool={pool or 'null'}")
    entry = next(iter(report.entries["train"].values()))
    assert len(ClipCache(cfg.storage.clip_cache).read_clips(entry)[1]) == cfg.data.cached_train_views
    out = fit(cfg, manifest, report, "share")
    m = out.result.metrics
    videos = len(manifest.rows["train"])
    per_rank = -(-videos // 2) * cfg.data.train_views   # shares padded to equal length: equal step counts
    assert m["train_clips_per_rank"] == [per_rank, per_rank] and m["train_clips"] == 2 * per_rank
    assert m["train_shard_overlap"] == 0                # no clip trained by both ranks
    assert m["train_steps"] == -(-per_rank // cfg.train.batch_size)
    assert m["replica_drift"] == 0.0                    # DDP kept the two replicas identical
    assert len(m["step_s_per_rank"]) == 2 and min(m["peak_memory_mb_per_rank"]) > 100
    assert m["val_videos"] == len(manifest.rows["val"])                 # every val video, on one rank each
    assert sum(map(sum, m["val_confusion"])) == len(manifest.rows["val"])
    assert {"train_ce", "train_feat", "train_attn", "train_asym", "train_kd_teacher", "val_macro_f1",
            "clips_per_s", "lr"} <= set(m)
    assert set(m["val_per_class"]) == set(manifest.labels)
    assert (out.student_dir / "model.safetensors").is_file()


def test_a_killed_worker_resumes_from_the_last_checkpoint(synth_root, smoke_zoo, tmp_path, ray_local):
    from tmad_ray.train.run import fit

    # attention rows sampled (attn_query_tokens) and accumulation on: what must survive the restart exactly
    cfg, manifest, report = prepared(tmp_path, synth_root, smoke_zoo, "train.epochs=3", "train.max_failures=2",
                                     "faults.kill_worker_at=[2,1]", "faults.kill_worker_rank=1",
                                     "distill.attn_query_tokens=8", "distill.gamma=1.0", "train.grad_accum=2")
    out = fit(cfg, manifest, report, "killed")
    assert out.result.error is None and out.result.metrics["epoch"] == 3
    assert list(Path(cfg.storage.output_dir).glob("killed_*")), "the kill switch never fired"
    events = [json.loads(line) for line in (Path(cfg.storage.output_dir) / "killed" / "train_log.jsonl").open()]
    starts = [e for e in events if e["event"] == "start"]
    assert [(s["epoch"], s["resumed"]) for s in starts] == [(0, False), (1, True)]   # restarted after epoch 1
    epoch_starts = [e["epoch"] for e in events if e["event"] == "epoch_start"]
    assert epoch_starts == [1, 2, 2, 3]            # epoch 1 was not redone; the interrupted epoch 2 was
    assert [h["epoch"] for h in epoch_history(Path(cfg.storage.output_dir) / "killed" / "train_log.jsonl")] == [1, 2, 3]

    # The same run, never killed: the resumed one continued bit for bit (weights, optimizer, schedule,
    # data order, crops and the sampled attention rows all come back from the checkpoint or the epoch's seed)
    cfg.faults.kill_worker_at = None
    fit(cfg, manifest, report, "unbroken")

    def history(name):
        return [{k: h[k] for k in ("epoch", "train_loss", "train_attn", "val_loss", "val_accuracy")}
                for h in epoch_history(Path(cfg.storage.output_dir) / name / "train_log.jsonl")]
    assert history("killed") == history("unbroken")


def test_training_reads_the_frozen_target_cache(synth_root, smoke_zoo, tmp_path, ray_local):
    from tmad_ray.study import prepare_study
    from tmad_ray.data.cache import ClipCache
    from tmad_ray.train.run import fit

    cfg = smoke_config(tmp_path, synth_root, *smoke_zoo, "distill.cache_targets=true", "train.epochs=1",
                       "distill.attn_query_tokens=8")
    manifest, report, _ = prepare_study(cfg)
    assert report.targets_key and ClipCache(cfg.storage.clip_cache).size_bytes("targets") > 0
    out = fit(cfg, manifest, report, "cached")
    m = out.result.metrics
    assert {"train_feat", "train_attn", "train_asym", "train_kd_teacher"} <= set(m)
    assert m["train_clips"] == len(manifest.rows["train"]) * cfg.data.train_views


def test_a_run_whose_loss_is_not_finite_stops_at_once_and_exports_nothing(synth_root, smoke_zoo, tmp_path, ray_local,
                                                                         capsys):
    """A learning rate that blows the weights up: the epoch's loss is NaN or infinite, the run ends
    with that reason (rc 2), without training on or exporting a student."""
    from tmad_ray.cli import main

    overrides = [f"data.root={synth_root}", "data.synthetic=null", f"storage.clip_cache={tmp_path / 'clips'}",
                 f"storage.output_dir={tmp_path / 'out'}", f"storage.ray_results={tmp_path / 'ray'}", *smoke_zoo,
                 "train.lr=1e30", "train.warmup_ratio=0", "train.grad_clip=null", "train.epochs=3"]
    rc = main(["train", "--config", str(REPO / "experiments" / "smoke.yaml"), "--name", "diverged", *overrides])
    out, err = capsys.readouterr()
    assert rc == 2, out[-2000:] + err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: nothing exported: epoch ") and "the training loss is" in line, line
    assert "lower train.lr" in line
    events = [json.loads(line) for line in (tmp_path / "out" / "diverged" / "train_log.jsonl").open()]
    [stop] = [e["epoch"] for e in events if e["event"] == "non_finite_loss"]
    assert stop < 3 and not [e for e in events if e["event"] == "epoch_start" and e["epoch"] > stop]  # at once
    # one step per epoch here: the first step's loss is finite, the weights it leaves are not
    assert not (tmp_path / "out" / "diverged" / "best_student").exists()


@pytest.fixture
def small_volume(tmp_path):
    """A 1.2 MB tmpfs: room for one smoke checkpoint (~0.75 MB), not two. Needs mount (root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_checkpoint_that_fills_the_volume_is_removed_and_the_error_names_it(synth_root, smoke_zoo, tmp_path,
                                                                              ray_local, capsys, small_volume):
    from tmad_ray.cli import main

    overrides = [f"data.root={synth_root}", "data.synthetic=null", f"storage.clip_cache={tmp_path / 'clips'}",
                 f"storage.output_dir={tmp_path / 'out'}", f"storage.ray_results={small_volume}", *smoke_zoo,
                 "train.epochs=3", "train.max_failures=0"]
    rc = main(["train", "--config", str(REPO / "experiments" / "smoke.yaml"), "--name", "full", *overrides])
    out, err = capsys.readouterr()
    assert rc == 2, out[-2000:] + err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: cannot write ") and "the volume is full" in line and str(small_volume) in line, line
    events = [json.loads(line) for line in (tmp_path / "out" / "full" / "train_log.jsonl").open()]
    assert [e for e in events if e["event"] == "partial_checkpoint_removed"]
    # what is left on the volume is whole: the first epoch's checkpoint, no half of the second
    checkpoints = sorted(p for p in small_volume.rglob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "state.pt").stat().st_size > 100_000, checkpoints
