"""Batches for the training workers, read straight from the clip cache, in a new seeded order each epoch.

    shard = TrainShard(cache_uri, entries, labels, rank=r, world=w, seed=s, views=V, clip_bytes=b,
                       batch_size=8, hold_mb=2048, window_clips=64)
    for batch in shard.batches(epoch): ...   # {clip uint8 [B,T,S,S,3], label, video_id, view}

How a rank's clips are chosen and ordered (what ``torch.utils.data.DistributedSampler`` users expect,
at the level of cache entries, which hold all views of one video):

* **Shares.** The train videos are permuted once (seeded) and dealt round-robin to the ranks; a
  rank keeps its share for the whole run (so it can keep it in memory). Shares are padded to the
  same length with videos of the rank's own share, drawn anew each epoch, so every rank makes the
  same number of steps (DDP needs it) and no clip is trained by two ranks in one epoch.
* **Order.** Each epoch the rank's videos are permuted again, seeded by ``(seed, epoch, rank)``.
  Their clips (views) are then shuffled within windows of ``window_clips`` clips, so the views of
  one video land in different batches. When the whole share fits ``hold_mb`` it is one window (a
  full permutation of its clips) and stays in memory after it is first read; otherwise it streams
  from the cache every epoch, a few entries ahead on threads, holding about two windows.
* **Reproducible.** The order depends only on the seed, the epoch, the rank, the world size and
  the config, never on what the process did before: a run resumed from a checkpoint trains the
  same batches as one that never stopped.

Reading the cache directly (not through a Ray Data pass per epoch) is what makes that order
possible: ``streaming_split`` hands blocks to whichever rank asks first, so no seed fixes which
clips a rank gets, and each pass pays Ray Data's start-up. Decoding, the expensive stage, stays a
Ray Data job (``pipeline.fill_cache``); what is read here is already-decoded uint8.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np

from tmad_ray.data.cache import ClipCache, CorruptEntry
from tmad_ray.errors import UserError


class LoaderError(UserError, RuntimeError):
    pass


def deal(video_ids, seed: int, world: int) -> list[list[str]]:
    """Every rank's share of ``video_ids``: a seeded permutation dealt round-robin (sizes differ by at most 1)."""
    ids = sorted(video_ids)
    order = np.random.default_rng([seed, 7]).permutation(len(ids))
    return [[ids[i] for i in order[r::world]] for r in range(world)]


class EntryReader:
    """Reads whole cache entries (``[V,T,H,W,C]`` uint8, all views of a video) in a given order, up to
    ``ahead`` entries in advance on ``threads`` threads; with ``hold``, keeps every entry it has read."""

    def __init__(self, cache_uri: str, keys: dict[str, str], hold: bool = False, threads: int = 4, redecode=None):
        self.cache_uri, self.keys, self.hold, self.threads = cache_uri, keys, hold, threads
        self.redecode = redecode  # (video_id, key, why) -> clips: a corrupt entry decoded again (pipeline.redecode_entry)
        self.held: dict[str, np.ndarray] = {}
        self.held_bytes = 0
        self._cache: ClipCache | None = None

    def _read(self, video_id: str) -> np.ndarray:
        if self._cache is None:
            self._cache = ClipCache(self.cache_uri)
        try:
            _, clips = self._cache.read_clips(self.keys[video_id])
        except CorruptEntry as e:
            if self.redecode is None:
                raise
            clips = self.redecode(video_id, self.keys[video_id], e.reason)
        return clips

    def _submit(self, pool: ThreadPoolExecutor, video_id: str) -> Future:
        if video_id in self.held:
            done: Future = Future()
            done.set_result(self.held[video_id])
            return done
        return pool.submit(self._read, video_id)

    def read(self, video_ids: list[str], ahead: int) -> Iterator[tuple[str, np.ndarray]]:
        """``(video_id, clips)`` in the order given (a video may come more than once)."""
        pool = ThreadPoolExecutor(max(1, self.threads), thread_name_prefix="clip-read")
        try:
            todo = iter(video_ids)
            pending: deque = deque()
            for vid in todo:
                pending.append((vid, self._submit(pool, vid)))
                if len(pending) >= max(1, ahead):
                    break
            while pending:
                vid, fut = pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt, self._submit(pool, nxt)))
                clips = fut.result()
                if self.hold and vid not in self.held:
                    self.held[vid] = clips
                    self.held_bytes += clips.nbytes
                yield vid, clips
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _batch(items: list[tuple[str, int, np.ndarray]], labels: dict[str, int]) -> dict:
    return {"clip": np.stack([c for _, _, c in items]),
            "label": np.array([labels[v] for v, _, _ in items], np.int64),
            "video_id": np.array([v for v, _, _ in items]), "view": np.array([w for _, w, _ in items], np.int32)}


class TrainShard:
    """One rank's train clips: the same number of steps on every rank, a new seeded order every epoch.

    ``entries``: video id -> clip-cache key for the whole train split (every rank gets the same dict);
    ``labels``: video id -> class id; ``views``: clips per entry (``data.train_view_pool`` or
    ``data.train_views``); ``epoch_views``: how many of them a video gives each epoch (a seeded draw
    per video and epoch; None: all); ``clip_bytes``: bytes of one clip, to decide whether the share
    is held in memory.
    """

    def __init__(self, cache_uri: str, entries: dict[str, str], labels: dict[str, int], *, rank: int, world: int,
                 seed: int, views: int, clip_bytes: int, batch_size: int, hold_mb: float, window_clips: int,
                 threads: int = 4, epoch_views: int | None = None, redecode=None):
        if len(entries) < world:
            raise LoaderError(f"{len(entries)} train videos for {world} workers: every worker needs at least one "
                              "(lower train.num_workers)")
        shares = deal(entries, seed, world)
        self.own = shares[rank]
        self.per_rank = max(len(s) for s in shares)  # every rank pads its share to this
        self.rank, self.seed, self.views, self.batch_size = rank, seed, views, batch_size
        self.per_video = min(epoch_views or views, views)  # clips a video gives in one epoch
        self.labels = labels
        self.clips = self.per_rank * self.per_video
        self.steps = math.ceil(self.clips / batch_size)
        self.held = self.per_rank * views * clip_bytes <= hold_mb * 2**20
        self.window = self.per_rank if self.held else max(1, window_clips // self.per_video)
        self.reader = EntryReader(cache_uri, {v: entries[v] for v in self.own}, hold=self.held, threads=threads,
                                  redecode=redecode)

    def order(self, epoch: int) -> list[tuple[str, int]]:
        """The ``(video_id, view)`` of every clip this rank trains on in ``epoch``, in order."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        vids = [self.own[i] for i in rng.permutation(len(self.own))]
        vids += [self.own[i] for i in rng.choice(len(self.own), self.per_rank - len(self.own), replace=False)]
        out = []
        for i in range(0, len(vids), self.window):
            items = [(v, int(w)) for v in vids[i:i + self.window] for w in
                     (range(self.views) if self.per_video == self.views else
                      np.sort(rng.choice(self.views, self.per_video, replace=False)))]
            out += [items[j] for j in rng.permutation(len(items))]
        return out

    def batches(self, epoch: int) -> Iterator[dict]:
        """``{"clip": uint8 [B,T,S,S,3], "label": int64 [B], "video_id": [B], "view": int32 [B]}``, ``steps`` of them."""
        order = self.order(epoch)
        size = self.window * self.per_video
        windows = [order[i:i + size] for i in range(0, len(order), size)]
        # one read per video and window, in first-use order
        reads = self.reader.read([v for win in windows for v in dict.fromkeys(x for x, _ in win)],
                                 ahead=self.window)  # the window being batched and the next one in memory
        buf: list[tuple[str, int, np.ndarray]] = []
        for win in windows:
            got: dict[str, np.ndarray] = {}
            for _ in dict.fromkeys(v for v, _ in win):
                vid, clips = next(reads)
                if len(clips) != self.views:
                    raise LoaderError(f"cache entry of {vid} holds {len(clips)} views, expected {self.views} "
                                      "(data.train_view_pool or data.train_views): refill the clip cache "
                                      "(tmad-ray data cache)")
                got[vid] = clips
            for vid, w in win:
                buf.append((vid, w, got[vid][w]))
                if len(buf) == self.batch_size:
                    yield _batch(buf, self.labels)
                    buf = []
        if buf:
            yield _batch(buf, self.labels)
        reads.close()


class EvalShard:
    """One rank's val (or test) videos, every view of a video on the same rank, in a fixed order;
    held in memory after the first pass when they fit ``hold_mb``."""

    def __init__(self, cache_uri: str, entries: dict[str, str], labels: dict[str, int], *, rank: int, world: int,
                 hold_mb: float, threads: int = 4, redecode=None):
        self.own = [v for i, v in enumerate(sorted(entries)) if i % world == rank]
        self.labels, self.budget = labels, hold_mb * 2**20
        self.reader = EntryReader(cache_uri, {v: entries[v] for v in self.own}, hold=True, threads=threads,
                                  redecode=redecode)

    def batches(self, batch_size: int) -> Iterator[dict]:
        buf: list[tuple[str, int, np.ndarray]] = []
        for vid, clips in self.reader.read(self.own, ahead=4):
            if self.reader.hold and self.reader.held_bytes > self.budget:
                self.reader.held.clear()  # too big to keep: read again every epoch
                self.reader.hold, self.reader.held_bytes = False, 0
            buf += [(vid, w, c) for w, c in enumerate(clips)]
            while len(buf) >= batch_size:
                yield _batch(buf[:batch_size], self.labels)
                buf = buf[batch_size:]
        if buf:
            yield _batch(buf, self.labels)
