"""Train clips reach the workers in a seeded order that changes every epoch, held in memory or streamed.

The dataset mimics the embedded default's: 4 classes, videos named ``videos/{label}_{i}.mp4`` (so a
sorted read is sorted by class), 2 views per video, batches of 8. Every clip's pixels encode its
video and view, so a test can check that a batch holds what its labels say.
"""

import numpy as np
import pytest

from tmad_ray.data.cache import ClipCache
from tmad_ray.data.loader import EvalShard, LoaderError, TrainShard, deal

CLASSES = ["A", "B1", "B2", "G"]
VIEWS, SHAPE = 2, (2, 4, 4, 3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """56 train videos (14 per class, as the embedded default's train split) in a real clip cache."""
    uri = str(tmp_path_factory.mktemp("clips"))
    c = ClipCache(uri)
    entries, labels = {}, {}
    for ci, label in enumerate(CLASSES):
        for i in range(14):
            vid, key = f"videos/{label}_{i}.mp4", f"{ci:02d}{i:02d}" + "ab" * 10
            clips = np.stack([np.full(SHAPE, 0, np.uint8) for _ in range(VIEWS)])
            for w in range(VIEWS):
                clips[w, 0, 0, 0] = (ci, i, w)  # the clip says which video and view it is
            c.write_clips(key, vid, clips)
            entries[vid], labels[vid] = key, ci
    return uri, entries, labels


def shard(cache, *, rank=0, world=1, seed=0, hold_mb=64.0, window=64, batch=8, epoch_views=None):
    uri, entries, labels = cache
    return TrainShard(uri, entries, labels, rank=rank, world=world, seed=seed, views=VIEWS,
                      clip_bytes=int(np.prod(SHAPE)), batch_size=batch, hold_mb=hold_mb, window_clips=window,
                      epoch_views=epoch_views)


def read_epoch(s, epoch):
    batches = list(s.batches(epoch))
    for b in batches:  # each clip is the one its video id, view and label name
        for clip, vid, view, label in zip(b["clip"], b["video_id"], b["view"], b["label"]):
            ci, i, w = clip[0, 0, 0]
            assert (CLASSES[ci], i, w) == (vid.split("/")[1].split("_")[0], int(vid.split("_")[1][:-4]), view)
            assert label == ci
    return batches


def sequence(batches):
    return [(v, int(w)) for b in batches for v, w in zip(b["video_id"], b["view"])]


@pytest.mark.parametrize("hold_mb", [64.0, 0.0], ids=["held", "streamed"])
def test_every_epoch_is_a_new_order_of_every_clip_and_every_batch_mixes_classes(cache, hold_mb):
    s = shard(cache, hold_mb=hold_mb)
    assert s.held is (hold_mb > 0)
    epochs = [read_epoch(s, e) for e in (1, 2, 3)]
    orders = [sequence(b) for b in epochs]
    everything = sorted((v, w) for v in cache[1] for w in range(VIEWS))
    for order in orders:
        assert sorted(order) == everything  # every clip once per epoch
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert orders[0] != sorted(orders[0])  # not the cache's (class-sorted) order
    for batches in epochs:
        assert len(batches) == s.steps == 14
        assert all(len(set(b["label"].tolist())) >= 2 for b in batches), [b["label"] for b in batches]
        # the two views of a video are spread over batches: rarely in the same one
        together = sum(len(b["video_id"]) - len(set(b["video_id"])) for b in batches)
        assert together <= 0.3 * len(cache[1])
    if hold_mb == 0:
        assert s.reader.held == {}  # streamed: nothing kept between epochs


@pytest.mark.parametrize("hold_mb", [64.0, 0.0], ids=["held", "streamed"])
def test_the_same_seed_and_epoch_give_the_same_order_whatever_ran_before(cache, hold_mb):
    a = shard(cache, hold_mb=hold_mb)
    for e in (1, 2):
        read_epoch(a, e)
    third = sequence(read_epoch(a, 3))
    fresh = shard(cache, hold_mb=hold_mb)  # e.g. a worker restarted from the epoch-2 checkpoint
    assert sequence(read_epoch(fresh, 3)) == third
    assert sequence(read_epoch(shard(cache, hold_mb=hold_mb, seed=1), 3)) != third


def test_ranks_get_disjoint_equal_shares_covering_the_split(cache):
    _, entries, _ = cache
    shards = [shard(cache, rank=r, world=3) for r in range(3)]
    assert len({s.steps for s in shards}) == 1  # DDP: every rank makes the same number of steps
    epoch = [sequence(read_epoch(s, 1)) for s in shards]
    assert all(len(e) == 19 * VIEWS for e in epoch)  # 56 videos / 3 ranks -> 19 each (one padded)
    videos = [{v for v, _ in e} for e in epoch]
    assert not (videos[0] & videos[1]) and not (videos[0] & videos[2]) and not (videos[1] & videos[2])
    assert set().union(*videos) == set(entries)
    assert deal(entries, 0, 3) == deal(entries, 0, 3) and deal(entries, 0, 3) != deal(entries, 1, 3)
    with pytest.raises(LoaderError, match="train.num_workers"):
        shard(cache, world=100)


def test_eval_shards_split_videos_and_keep_every_view_together(cache):
    uri, entries, labels = cache
    shards = [EvalShard(uri, entries, labels, rank=r, world=2, hold_mb=64) for r in range(2)]
    seen = [[(v, int(w)) for b in s.batches(5) for v, w in zip(b["video_id"], b["view"])] for s in shards]
    assert sorted(seen[0] + seen[1]) == sorted((v, w) for v in entries for w in range(VIEWS))
    assert not {v for v, _ in seen[0]} & {v for v, _ in seen[1]}
    assert [(v, int(w)) for b in shards[0].batches(5) for v, w in zip(b["video_id"], b["view"])] == seen[0]
    assert len(shards[0].reader.held) == len(shards[0].own)  # small: kept after the first pass
    tight = EvalShard(uri, entries, labels, rank=0, world=2, hold_mb=3 * VIEWS * np.prod(SHAPE) / 2**20)
    again = [[(v, int(w)) for b in tight.batches(5) for v, w in zip(b["video_id"], b["view"])] for _ in range(2)]
    assert again[0] == again[1] == seen[0]
    assert tight.reader.held == {} and not tight.reader.hold  # over its budget: never more than ~3 videos held


@pytest.mark.parametrize("hold_mb", [64.0, 0.0], ids=["held", "streamed"])
def test_a_view_pool_gives_each_video_a_seeded_subset_of_its_views_each_epoch(cache, hold_mb):
    # data.train_view_pool: the entries hold the pool (here 2 views), an epoch trains 1 of them per video
    s = shard(cache, hold_mb=hold_mb, window=8, epoch_views=1)
    assert s.clips == 56 and s.steps == 7
    epochs = [sequence(read_epoch(s, e)) for e in range(1, 7)]
    for order in epochs:
        assert sorted(v for v, _ in order) == sorted(cache[1])  # every video once an epoch
    picked = {v: {w for order in epochs for x, w in order if x == v} for v in cache[1]}
    assert sum(len(ws) == 2 for ws in picked.values()) > 40  # over 6 epochs most videos used both views
    assert sequence(read_epoch(shard(cache, hold_mb=hold_mb, window=8, epoch_views=1), 3)) == epochs[2]


def test_the_view_pool_is_what_the_cache_holds():
    from tmad_ray.config import EXPERIMENTS_DIR, load_config
    from tmad_ray.data.clips import ViewSpec

    cfg = load_config(EXPERIMENTS_DIR / "smoke.yaml", ["data.train_views=2", "data.train_view_pool=8"])
    assert ViewSpec.from_config(cfg.data, "train").train_views == 8 and cfg.data.cached_train_views == 8
    with pytest.raises(ValueError, match="train_view_pool .1. must be >= data.train_views .2."):
        load_config(EXPERIMENTS_DIR / "smoke.yaml", ["data.train_views=2", "data.train_view_pool=1"])
