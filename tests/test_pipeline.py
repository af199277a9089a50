"""Ray Data decode into the clip cache: reuse, per-video invalidation, faults, atomicity."""

import os
import shutil
import signal
import time

import numpy as np
import pytest

from conftest import smoke_config
from tmad_ray.data.cache import ClipCache, clips_from_batch, video_key
from tmad_ray.data.clips import BadVideo, UnreadableVideo, ViewSpec, decode_views
from tmad_ray.data.manifest import load_manifest
from tmad_ray.data.pipeline import DecodeToCache, clip_dataset, decode_to_cache, fill_cache
from tmad_ray.data.sandbox import Sandbox
from tmad_ray.data.synthetic import make_scene, render_video, write_mp4


def manifest_of(cfg):
    return load_manifest(cfg.data.root, cfg.data.label_mode, cfg.data.val_fraction, cfg.data.split_seed)


# ---------------------------------------------------------------- cache entries (no Ray)

def test_entry_round_trip_and_atomic_write(tmp_path):
    cache = ClipCache(str(tmp_path / "c"))
    clips = np.random.default_rng(0).integers(0, 255, size=(3, 4, 8, 8, 3), dtype=np.uint8)
    assert cache.lookup("ab" * 32) == ("missing", None)
    cache.write_clips("ab" * 32, "videos/x.mp4", clips)
    ids, back = cache.read_clips("ab" * 32)
    assert ids == ["videos/x.mp4"] * 3
    np.testing.assert_array_equal(back, clips)
    assert cache.lookup("ab" * 32) == ("clips", None)
    cache.write_bad("ef" * 32, "videos/y.mp4", "no video stream")
    assert cache.lookup("ef" * 32) == ("bad", "no video stream")

    # A write that fails half-way leaves neither an entry nor a temporary file behind.
    def broken(f):
        f.write(b"PAR1 half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cache.store.write(cache.entry_parts("cd" * 32), broken)
    assert cache.lookup("cd" * 32) == ("missing", None)
    assert [p.name for p in (tmp_path / "c" / "cd").iterdir()] == []


def test_key_changes_with_file_and_decode_params(tmp_path):
    video = tmp_path / "v.mp4"
    write_mp4(video, render_video(make_scene("A", np.random.default_rng(0), 32, 32, 16)))
    spec = ViewSpec("eval", 8, "stride", 2, 32, 37, 1, 1, 1, 0)
    key = video_key(str(video), spec)
    assert key == video_key(str(video), spec)
    assert key != video_key(str(video), ViewSpec("eval", 8, "stride", 4, 32, 37, 1, 1, 1, 0))
    os.utime(video, ns=(1, 1))  # touched, same bytes: nothing to decode again
    assert key == video_key(str(video), spec)
    # replaced by other content of the same size with the old mtime kept (cp -p, rsync -t): a new key
    st, other = video.stat(), tmp_path / "other.mp4"
    write_mp4(other, render_video(make_scene("B1", np.random.default_rng(1), 32, 32, 16)))
    body = other.read_bytes()[:st.st_size].ljust(st.st_size, b"\0")
    video.write_bytes(body)
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert video.stat().st_size == st.st_size and video.stat().st_mtime_ns == st.st_mtime_ns
    assert key != video_key(str(video), spec)


def test_a_truncated_or_changed_entry_is_caught_and_a_worker_decodes_it_again(tmp_path, capsys):
    from tmad_ray.data.cache import CorruptEntry
    from tmad_ray.data.loader import EntryReader
    from tmad_ray.data.pipeline import redecode_entry

    video = tmp_path / "videos" / "v.mp4"
    video.parent.mkdir()
    write_mp4(video, render_video(make_scene("A", np.random.default_rng(0), 32, 32, 16)))
    spec = ViewSpec("eval", 8, "stride", 2, 32, 37, 1, 1, 1, 0)
    cache, key = ClipCache(str(tmp_path / "c")), video_key(str(video), spec)
    clips = decode_views(str(video), spec)
    cache.write_clips(key, "videos/v.mp4", clips)
    entry = tmp_path / "c" / key[:2] / f"{key}.parquet"
    good = entry.read_bytes()
    # bytes flipped inside a clip: the footer still reads, the checksum does not match
    at = good.index(clips[0].tobytes()[:64]) + 100
    entry.write_bytes(good[:at] + bytes(b ^ 0xFF for b in good[at:at + 2000]) + good[at + 2000:])
    assert cache.lookup(key) == ("clips", None)
    with pytest.raises(CorruptEntry, match="fails its checksum"):
        cache.read_clips(key)
    # a training worker's reader decodes the video again, rewrites the entry and goes on
    heal = lambda vid, k, why: redecode_entry(cache.uri, str(tmp_path), spec.__dict__, vid, k, why)  # noqa: E731
    reader = EntryReader(cache.uri, {"videos/v.mp4": key}, redecode=heal)
    [(vid, back)] = list(reader.read(["videos/v.mp4"], ahead=1))
    np.testing.assert_array_equal(back, clips)
    assert "the entry of videos/v.mp4 is corrupt (view 0 fails its checksum" in capsys.readouterr().out
    np.testing.assert_array_equal(cache.read_clips(key)[1], clips)  # rewritten whole
    # truncated: no Parquet footer, caught by the lookup before any worker reads it
    entry.write_bytes(good[: len(good) // 2])
    state, why = cache.lookup(key)
    assert state == "corrupt" and why
    with pytest.raises(CorruptEntry):
        cache.read_clips(key)


def _crash():
    os.kill(os.getpid(), signal.SIGSEGV)


def _bad():
    raise BadVideo("nope")


def _bug():
    raise KeyError("a bug, not a bad video")


def test_sandbox_turns_crashes_and_hangs_into_bad_videos_and_survives():
    box = Sandbox()
    try:
        with pytest.raises(BadVideo, match="crashed"):
            box.call(_crash, timeout=30)
        with pytest.raises(BadVideo, match="timed out"):
            box.call(time.sleep, 60, timeout=1)
        with pytest.raises(BadVideo, match="nope"):
            box.call(_bad, timeout=30)
        with pytest.raises(RuntimeError, match="a bug, not a bad video"):
            box.call(_bug, timeout=30)
        assert box.call(sum, [1, 2, 3], timeout=30) == 6  # the replacement child works
    finally:
        box.close()


def test_a_file_this_node_cannot_read_is_never_cached_as_a_bad_video(synth_root, tmp_path):
    # On a cluster the cache is shared and a path may exist on one node only: ENOENT is not a verdict.
    spec = ViewSpec.from_config(smoke_config(tmp_path, synth_root).data, "train")
    cache = ClipCache(str(tmp_path / "clips"))
    with pytest.raises(UnreadableVideo, match="cannot read the file on this node"):
        decode_to_cache(str(tmp_path / "gone.mp4"), "ab" * 20, "videos/gone.mp4", spec.__dict__, cache.uri, [])
    assert cache.lookup("ab" * 20) == ("missing", None)
    # a file that was read and failed to decode is a verdict, cached
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 100)
    with pytest.raises(BadVideo):
        decode_to_cache(str(tmp_path / "junk.mp4"), "cd" * 20, "videos/junk.mp4", spec.__dict__, cache.uri, [])
    assert cache.lookup("cd" * 20)[0] == "bad"
    # through the actor (and its sandboxed child): reported with the node, still not cached
    udf = DecodeToCache(cache.uri, 30.0, [])
    out = udf({"abspath": [str(tmp_path / "gone.mp4")], "key": ["ef" * 20], "video_id": ["videos/gone.mp4"],
               "spec": [spec.__dict__]})
    assert out["status"][0] == "unreadable" and "(node " in out["detail"][0] and "not cached" in out["detail"][0]
    assert cache.lookup("ef" * 20) == ("missing", None)
    udf.sandbox.close()


# ---------------------------------------------------------------- Ray Data (integration)

@pytest.mark.integration
def test_an_older_versions_verdict_on_an_unreadable_file_is_dropped_once(dataset_copy, tmp_path, ray_local, capsys):
    cfg = smoke_config(tmp_path, dataset_copy)
    m = manifest_of(cfg)
    row = m.rows["train"][0]
    key = video_key(row.abspath(m.root), ViewSpec.from_config(cfg.data, "train"))
    ClipCache(cfg.storage.clip_cache).write_bad(key, row.path, "missing or unreadable file (No such file or directory)")
    report = fill_cache(m, cfg)
    assert report.stale_verdicts == 1 and report.bad == [] and report.entries["train"][row.path] == key
    assert "1 'bad video' verdict(s) an older version cached for files it could not read" in capsys.readouterr().out
    assert ClipCache(cfg.storage.clip_cache).lookup(key) == ("clips", None)


@pytest.mark.integration
def test_a_truncated_entry_is_dropped_and_decoded_again_and_the_run_goes_on(dataset_copy, tmp_path, ray_local, capsys):
    cfg = smoke_config(tmp_path, dataset_copy)
    m = manifest_of(cfg)
    first = fill_cache(m, cfg)
    row = m.rows["train"][0]
    key = first.entries["train"][row.path]
    entry = tmp_path / "clips" / key[:2] / f"{key}.parquet"
    entry.write_bytes(entry.read_bytes()[:100])
    again = fill_cache(m, cfg)
    assert (again.decoded, again.reused, again.bad) == (1, 15, []) and again.entries["train"][row.path] == key
    assert f"clip cache: 1 corrupt entry removed, decoded again: {row.path} (" in capsys.readouterr().out
    ClipCache(cfg.storage.clip_cache).read_clips(key)  # whole again


@pytest.mark.integration
def test_second_run_decodes_nothing_and_changes_decode_only_themselves(dataset_copy, tmp_path, ray_local):
    cfg = smoke_config(tmp_path, dataset_copy)
    first = fill_cache(manifest_of(cfg), cfg)
    assert (first.videos, first.decoded, first.reused, len(first.bad)) == (16, 16, 0, 0)
    assert first.clips_written == 16  # smoke: 1 train view, 1x1 eval view

    second = fill_cache(manifest_of(cfg), cfg)
    assert (second.decoded, second.reused, second.clips_written) == (0, 16, 0)
    assert second.entries == first.entries

    # Re-encode one video (new content, new mtime) and add one: only those two are decoded.
    changed = dataset_copy / "videos" / "B2_0003.mp4"
    write_mp4(changed, render_video(make_scene("B2", np.random.default_rng(99), 32, 32, 16)))
    shutil.copy(dataset_copy / "videos" / "G_0003.mp4", dataset_copy / "videos" / "G_extra.mp4")
    with open(dataset_copy / "train.csv", "a") as f:
        f.write("videos/G_extra.mp4 G\n")
    third = fill_cache(manifest_of(cfg), cfg)
    assert (third.decoded, third.reused) == (2, 15)
    assert third.entries["train"]["videos/B2_0003.mp4"] != first.entries["train"]["videos/B2_0003.mp4"]

    # Other decode parameters are other entries.
    cfg2 = smoke_config(tmp_path, dataset_copy, "data.sampling_rate=1")
    assert fill_cache(manifest_of(cfg2), cfg2).decoded == 17


@pytest.mark.integration
def test_a_hanging_decoder_costs_one_video_not_the_pipeline(dataset_copy, tmp_path, ray_local):
    cfg = smoke_config(tmp_path, dataset_copy, "faults.hang_decode_on=[A_0003]", "data.decode_timeout_s=5")
    report = fill_cache(manifest_of(cfg), cfg)
    assert report.decoded == 15
    (bad,) = report.bad
    assert bad.path == "videos/A_0003.mp4" and "timed out after 5 s" in bad.reason
    # A timeout is not cached as a verdict: without the fault the video decodes next time.
    cfg_ok = smoke_config(tmp_path, dataset_copy, "data.decode_timeout_s=5")
    again = fill_cache(manifest_of(cfg_ok), cfg_ok)
    assert (again.decoded, again.reused, again.bad) == (1, 15, [])


@pytest.mark.integration
def test_clip_dataset_rows_hold_the_decoded_clips_and_labels(synth_root, tmp_path, ray_local):
    cfg = smoke_config(tmp_path, synth_root, "data.train_views=2")
    manifest = manifest_of(cfg)
    report = fill_cache(manifest, cfg)
    ds = clip_dataset(manifest, report, cfg, "train")
    rows = ds.take_all()
    assert len(rows) == 2 * len(manifest.rows["train"])
    assert {(r["video_id"], int(r["view"])) for r in rows} == {
        (row.path, v) for row in manifest.rows["train"] for v in (0, 1)}
    labels = {row.path: manifest.label2id[row.label] for row in manifest.rows["train"]}
    assert all(int(r["label"]) == labels[r["video_id"]] for r in rows)

    batch = next(iter(ds.iter_batches(batch_size=4, batch_format="numpy")))
    clips = clips_from_batch(batch)
    assert clips.shape == (4, 8, 37, 37, 3) and clips.dtype == np.uint8
    expected = decode_views(os.path.join(manifest.root, str(batch["video_id"][0])),
                            ViewSpec.from_config(cfg.data, "train"))
    np.testing.assert_array_equal(clips[0], expected[int(batch["view"][0])])


@pytest.mark.integration
def test_the_training_loader_reads_the_decoded_clips(synth_root, tmp_path, ray_local):
    from tmad_ray.data.loader import TrainShard
    from tmad_ray.train.worker import train_clip_bytes

    cfg = smoke_config(tmp_path, synth_root, "data.train_views=2")
    manifest = manifest_of(cfg)
    report = fill_cache(manifest, cfg)
    labels = {row.path: manifest.label2id[row.label] for row in manifest.rows["train"]}
    shard = TrainShard(cfg.storage.clip_cache, report.entries["train"], labels, rank=0, world=1, seed=0, views=2,
                       clip_bytes=train_clip_bytes(cfg), batch_size=4, hold_mb=0, window_clips=8)
    batches = list(shard.batches(1))
    assert sum(len(b["label"]) for b in batches) == 2 * len(manifest.rows["train"])
    b = batches[0]
    assert b["clip"].shape == (4, 8, 37, 37, 3) and b["clip"].dtype == np.uint8
    assert train_clip_bytes(cfg) == b["clip"][0].nbytes
    assert all(int(y) == labels[v] for y, v in zip(b["label"], b["video_id"]))
    expected = decode_views(os.path.join(manifest.root, str(b["video_id"][0])), ViewSpec.from_config(cfg.data, "train"))
    np.testing.assert_array_equal(b["clip"][0], expected[int(b["view"][0])])


@pytest.mark.integration
def test_a_video_in_two_eval_splits_is_decoded_once_and_in_both(dataset_copy, tmp_path, ray_local):
    with open(dataset_copy / "test.csv", "a") as f:
        f.write("videos/A_0000.mp4 A\n")  # also in val.csv
    cfg = smoke_config(tmp_path, dataset_copy)
    report = fill_cache(manifest_of(cfg), cfg)
    assert (report.videos, report.decoded, report.bad) == (17, 16, [])
    assert report.entries["val"]["videos/A_0000.mp4"] == report.entries["test"]["videos/A_0000.mp4"]
