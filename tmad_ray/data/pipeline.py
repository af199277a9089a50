"""Ray Data: manifest rows -> decode on CPU actors -> clip cache.

    report = fill_cache(manifest, cfg)           # decodes only what the cache lacks
    ds = clip_dataset(manifest, report, cfg, "train")  # the cached clips as a Ray Dataset (analysis, bench)

Training workers read the cache themselves (``loader.py``), in a seeded per-epoch order.

Decoding is the expensive stage, so it happens once per study: ``fill_cache`` looks every video
up in the cache on the driver (a stat and a key), and only the missing ones go through
``map_batches(DecodeToCache)``. Each ``DecodeToCache`` actor decodes in a child process of its
own, with a deadline per video: FFmpeg hanging or crashing on one file kills only that child,
the video is reported bad, and the pipeline goes on (``sandbox.py``). The child writes the
entry itself, so clips never travel through the object store.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from tmad_ray.data.cache import ClipCache, video_key
from tmad_ray.data.clips import BadVideo, UnreadableVideo, ViewSpec, decode_views
from tmad_ray.data.manifest import Manifest, Problem
from tmad_ray.data.sandbox import Sandbox
from tmad_ray.errors import UserError

MODES = {"train": "train", "val": "eval", "test": "eval"}
# How versions before 2026-12 worded a file they could not read; such verdicts are not kept.
STALE_VERDICT = "missing or unreadable file"


class DataError(UserError, RuntimeError):
    pass


def decode_to_cache(abspath: str, key: str, video_id: str, spec: dict, cache_uri: str,
                    hang_on: list[str]) -> int:
    """Decode one video's views into the cache (runs in a ``Sandbox``); returns the clip count.

    A ``BadVideo`` is recorded in the cache so that later runs skip the file without decoding it;
    an ``UnreadableVideo`` (this node cannot read the file) is not: the cache may be shared by nodes
    and runs that can.
    """
    if any(s in abspath for s in hang_on):  # test-only fault injection (config: faults)
        time.sleep(10**9)
    cache = ClipCache(cache_uri)
    try:
        clips = decode_views(abspath, ViewSpec(**spec))
    except UnreadableVideo:
        raise
    except BadVideo as e:
        cache.write_bad(key, video_id, str(e))
        raise
    cache.write_clips(key, video_id, clips)
    return len(clips)


def redecode_entry(cache_uri: str, root: str, spec: dict, video_id: str, key: str, why: str) -> np.ndarray:
    """A cache entry a training worker found corrupt (bytes changed since it was written): the video
    decoded again and its entry written again, so the run goes on. Returns ``[V, T, H, W, C]``."""
    print(f"clip cache: the entry of {video_id} is corrupt ({why}); decoded it again", flush=True)
    clips = decode_views(os.path.join(root, video_id), ViewSpec(**spec))
    ClipCache(cache_uri).write_clips(key, video_id, clips)
    return clips


class DecodeToCache:
    """Ray Data UDF (an actor): rows ``{abspath, key, video_id, spec}`` -> rows ``{key, status, detail, clips}``.

    Timeouts, crashes and files this node cannot read are reported (``unreadable`` names the node)
    but not recorded in the cache: a deadline can be missed on an overloaded node, and a path may be
    visible from one node and not another, so the next run tries the video again.
    """

    def __init__(self, cache_uri: str, timeout_s: float, hang_on: list[str]):
        self.cache_uri, self.timeout_s, self.hang_on = cache_uri, timeout_s, list(hang_on)
        self.sandbox = Sandbox()

    def __call__(self, batch: dict) -> dict:
        out = {"key": [], "status": [], "detail": [], "clips": []}
        for abspath, key, video_id, spec in zip(batch["abspath"], batch["key"], batch["video_id"], batch["spec"]):
            try:
                n = self.sandbox.call(decode_to_cache, str(abspath), str(key), str(video_id), dict(spec),
                                      self.cache_uri, self.hang_on, timeout=self.timeout_s)
                status, detail = "decoded", ""
            except UnreadableVideo as e:
                n, status, detail = 0, "unreadable", f"{e} (node {platform.node()}; not cached, tried again next run)"
            except BadVideo as e:
                n, status, detail = 0, "bad", str(e)
            out["key"].append(str(key))
            out["status"].append(status)
            out["detail"].append(detail)
            out["clips"].append(n)
        return {k: np.asarray(v) for k, v in out.items()}


@dataclass
class CacheReport:
    """What ``fill_cache`` did; ``bad`` lists (path, reason) for the data report artifact."""

    cache: str
    videos: int = 0
    decoded: int = 0
    reused: int = 0
    clips_written: int = 0
    seconds: float = 0.0
    bad: list[Problem] = field(default_factory=list)
    entries: dict[str, dict[str, str]] = field(default_factory=dict)  # split -> video_id -> key
    targets_key: str | None = None  # the frozen-target cache of the study (distill.cache_targets)
    stale_verdicts: int = 0  # "bad" verdicts an older version cached for files it could not read
    corrupt: list[str] = field(default_factory=list)  # entries found truncated: "video (why)"

    @property
    def clips_per_s(self) -> float:
        return self.clips_written / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"cache": self.cache, "videos": self.videos, "decoded": self.decoded, "reused": self.reused,
                "bad": len(self.bad), "clips_written": self.clips_written, "seconds": round(self.seconds, 3),
                "clips_per_s": round(self.clips_per_s, 2), "bad_videos": [p.as_dict() for p in self.bad]}


def _decode_concurrency(cfg) -> int:
    import ray

    if cfg.data.decode_concurrency:
        return cfg.data.decode_concurrency
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def fill_cache(manifest: Manifest, cfg, splits=("train", "val", "test")) -> CacheReport:
    """Make sure every video of ``splits`` has a cache entry (or a recorded reason why not).

    Long on purpose: the lookup, the stale verdicts, the decode job and the bookkeeping of one pass
    over the splits read in order; split up, what is decoded and why would hide between helpers."""
    import ray

    cache = ClipCache(cfg.storage.clip_cache)
    # Lines the manifest already rejected (malformed, unknown label, missing video) count as bad.
    report = CacheReport(cache=cfg.storage.clip_cache, videos=len(manifest.problems), bad=list(manifest.problems))
    todo, waiting = [], {}  # key -> every (split, row) that needs it (a video may be listed twice)
    for split in splits:
        spec = ViewSpec.from_config(cfg.data, MODES[split])
        report.entries[split] = {}
        for row in manifest.rows.get(split, []):
            report.videos += 1
            abspath = row.abspath(manifest.root)
            try:
                key = video_key(abspath, spec)
            except FileNotFoundError:
                report.bad.append(Problem(row.path, "missing video", row.file, row.line))
                continue
            if key in waiting:
                waiting[key].append((split, row))
                continue
            state, reason = cache.lookup(key)
            if state == "clips":
                report.reused += 1
                report.entries[split][row.path] = key
            elif state == "bad" and not reason.startswith(STALE_VERDICT):
                report.bad.append(Problem(row.path, reason, row.file, row.line))
            else:
                if state == "bad":  # an older version's verdict on a file it could not read: try again
                    cache.remove(key, ".bad.json")
                    report.stale_verdicts += 1
                elif state == "corrupt":  # truncated: dropped, decoded again
                    cache.remove(key, ".parquet")
                    report.corrupt.append(f"{row.path} ({reason})")
                waiting[key] = [(split, row)]
                todo.append({"abspath": abspath, "key": key, "video_id": row.path, "spec": dataclasses.asdict(spec)})

    _say_stale(report.stale_verdicts, report.corrupt)
    t0 = time.perf_counter()
    if todo:
        from tmad_ray.cluster import init_ray

        init_ray(cfg)  # the cluster under `ray job submit`, else a local Ray
        size = min(_decode_concurrency(cfg), len(todo))
        print(f"clip cache: decoding {len(todo)} videos ({size} at a time) into {cfg.storage.clip_cache}",
              file=sys.stderr, flush=True)  # stderr: `data cache --json` keeps stdout for its JSON
        statuses = (
            ray.data.from_items(todo, override_num_blocks=len(todo))
            .map_batches(DecodeToCache, batch_size=1, num_cpus=1,
                         compute=ray.data.ActorPoolStrategy(size=size),
                         fn_constructor_kwargs={"cache_uri": cfg.storage.clip_cache,
                                                "timeout_s": cfg.data.decode_timeout_s,
                                                "hang_on": cfg.faults.hang_decode_on})
            .take_all()
        )
        for status in statuses:
            rows = waiting.pop(str(status["key"]))
            if status["status"] == "decoded":
                report.decoded += 1
                report.clips_written += int(status["clips"])
                for split, row in rows:
                    report.entries[split][row.path] = str(status["key"])
            else:
                report.bad += [Problem(row.path, str(status["detail"]), row.file, row.line) for _, row in rows]
        if waiting:
            raise DataError(f"the decode pipeline returned no status for {[r.path for v in waiting.values() for _, r in v]}")
    report.seconds = time.perf_counter() - t0
    return report


def _say_stale(n: int, corrupt: list[str]) -> None:
    if n:
        print(f"clip cache: {n} 'bad video' verdict(s) an older version cached for files it could not read "
              "(not a verdict on the video) were removed; those videos are decoded again")
    if corrupt:
        print(f"clip cache: {len(corrupt)} corrupt entr{'y' if len(corrupt) == 1 else 'ies'} removed, decoded again: "
              + "; ".join(corrupt[:5]) + (" …" if len(corrupt) > 5 else ""))


def check_bad_fraction(report: CacheReport, max_bad_fraction: float) -> None:
    """Fail (after the report is written) when too many videos are unusable."""
    if report.videos and len(report.bad) / report.videos > max_bad_fraction:
        shown = "\n  ".join(str(p) for p in report.bad[:10])
        raise DataError(
            f"{len(report.bad)} of {report.videos} videos are unusable "
            f"(> data.max_bad_fraction={max_bad_fraction}):\n  {shown}\n"
            "Fix or remove them, or raise data.max_bad_fraction."
        )


def clip_dataset(manifest: Manifest, report: CacheReport, cfg, split: str):
    """The cached clips of ``split`` as a Ray Dataset with an int64 ``label`` column: rows
    ``{video_id, view, clip, shape, label}`` (for analysis and ``bench data``; training reads the
    cache through ``loader.TrainShard``)."""
    import ray

    entries = report.entries.get(split, {})
    if not entries:
        raise DataError(f"split {split!r} has no cached video; run `tmad-ray data cache` first")
    cache = ClipCache(cfg.storage.clip_cache)
    label_of = {r.path: manifest.label2id[r.label] for r in manifest.rows[split]}

    def add_label(batch):
        batch["label"] = np.array([label_of[str(v)] for v in batch["video_id"]], dtype=np.int64)
        return batch

    paths = [cache.entry_uri(entries[vid]) for vid in sorted(entries)]
    return ray.data.read_parquet(paths).map_batches(add_label, batch_format="numpy")
