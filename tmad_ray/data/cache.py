"""The clip cache: decoded clips in Parquet, one entry per video, on local disk or any URI.

An entry's key hashes the video's path, its size and a fingerprint of its content (the first and
last 64 KiB), and every decode parameter (``ViewSpec``), so a second run decodes nothing and a
changed or added video decodes only itself, even when a copy kept the old mtime (``cp -p``,
rsync). Entries are written under a temporary name and moved into place when complete: a
reader lists only final names, so a half-written entry is never read (on object stores a
single-object write is atomic too).

Entry layout (``<cache>/<key[:2]>/<key>.parquet``), one row per view::

    video_id: string   the path relative to the dataset root
    view:     int32    view index (train: temporal view; eval: clip * crops + crop)
    clip:     binary   uint8 T*H*W*C bytes (raw bytes + a fixed shape read back faster than
                       Arrow's tensor extension)
    shape:    list<int32>  [T, H, W, C]
    crc32:    int64    zlib.crc32 of ``clip``, checked on every read

An entry is verified, not trusted: ``lookup`` reads its Parquet footer (a truncated file has
none), and every read checks each clip's length and checksum; a bad entry raises
``CorruptEntry``, and the reader drops it and decodes the video again.

A video that cannot be decoded leaves ``<key>.bad.json`` with the reason, so later runs skip
it without decoding again; the verdict goes when the file changes (its key changes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tmad_ray.data.clips import ViewSpec
from tmad_ray.storage import Storage

CACHE_FORMAT = 2  # 2: content fingerprint in the key, crc32 per clip (format-1 entries are never read)
SCHEMA = pa.schema([("video_id", pa.string()), ("view", pa.int32()), ("clip", pa.binary()),
                    ("shape", pa.list_(pa.int32())), ("crc32", pa.int64())])
FINGERPRINT_BYTES = 64 * 1024  # read from each end of a video: an MP4's header or index sits at one end


class CorruptEntry(Exception):
    """A cache entry that cannot be read back as it was written (truncated, bytes changed)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"clip-cache entry {key[:12]}…: {reason}")
        self.key, self.reason = key, reason


def content_fingerprint(abspath: str) -> str:
    """sha256 of the size and the first and last ``FINGERPRINT_BYTES`` of a file (128 KiB read)."""
    h = hashlib.sha256()
    with open(abspath, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        h.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(f.read(FINGERPRINT_BYTES))
    return h.hexdigest()


def video_key(abspath: str, spec: ViewSpec) -> str:
    """Content-addressed key of one video's clips; raises ``FileNotFoundError`` if it is gone."""
    ident = {"format": CACHE_FORMAT, "path": os.path.abspath(abspath), "content": content_fingerprint(abspath),
             "spec": dataclasses.asdict(spec)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def verify_rows(key: str, rows: dict) -> dict:
    """``rows`` (an entry as columns) if every clip has its shape's length and its checksum, else
    ``CorruptEntry``."""
    if not rows.get("clip"):
        raise CorruptEntry(key, "no clips")
    for view, clip, shape, crc in zip(rows["view"], rows["clip"], rows["shape"], rows["crc32"]):
        if len(clip) != int(np.prod(shape)):
            raise CorruptEntry(key, f"view {view} has {len(clip)} bytes, its shape {list(shape)} needs {int(np.prod(shape))}")
        if zlib.crc32(clip) != crc:
            raise CorruptEntry(key, f"view {view} fails its checksum (bytes changed since it was written)")
    return rows


def clips_to_table(video_id: str, clips: np.ndarray) -> pa.Table:
    """``[V, T, H, W, C]`` uint8 -> an entry table of V rows."""
    if clips.dtype != np.uint8 or clips.ndim != 5:
        raise ValueError(f"expected uint8 [V,T,H,W,C] clips, got {clips.dtype} {clips.shape}")
    shape = list(clips.shape[1:])
    blobs = [c.tobytes() for c in clips]
    return pa.table({
        "video_id": [video_id] * len(clips),
        "view": np.arange(len(clips), dtype=np.int32),
        "clip": blobs,
        "shape": [shape] * len(clips),
        "crc32": [zlib.crc32(b) for b in blobs],
    }, schema=SCHEMA)


def clips_from_batch(batch: dict) -> np.ndarray:
    """A Ray Data / Arrow batch of entry rows -> ``[B, T, H, W, C]`` uint8."""
    shapes = {tuple(s) for s in batch["shape"]}
    if len(shapes) != 1:
        raise ValueError(f"a batch mixes clip shapes {sorted(shapes)}")
    shape = shapes.pop()
    return np.stack([np.frombuffer(b, np.uint8).reshape(shape) for b in batch["clip"]])


class ClipCache:
    """Entries under a local directory or a URI understood by ``pyarrow.fs`` (s3://, gs://, ...)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.store = Storage(uri)
        self.store.make_dirs()

    def __reduce__(self):  # ship the URI to Ray tasks, not the filesystem handle
        return (ClipCache, (self.uri,))

    @staticmethod
    def entry_parts(key: str, suffix: str = ".parquet") -> tuple[str, str]:
        return key[:2], f"{key}{suffix}"

    def entry_uri(self, key: str) -> str:
        """What ``ray.data.read_parquet`` should be given for this entry."""
        return self.store.uri(*self.entry_parts(key))

    def lookup(self, key: str) -> tuple[str, str | None]:
        """``("clips", None)``, ``("bad", reason)``, ``("corrupt", reason)`` (an entry whose Parquet
        footer cannot be read: truncated) or ``("missing", None)``."""
        # one listing call for both names: on an object store each call is a round trip
        store = self.store
        infos = store.fs.get_file_info([store.path(*self.entry_parts(key)),
                                        store.path(*self.entry_parts(key, ".bad.json"))])
        if infos[0].type == pafs.FileType.File:
            try:
                with store.fs.open_input_file(infos[0].path) as f:
                    pq.read_metadata(f)
            except (OSError, pa.ArrowException) as e:
                return "corrupt", str(e).splitlines()[0][:200]
            return "clips", None
        if infos[1].type == pafs.FileType.File:  # read it as listed: no second round trip to check it exists
            with store.fs.open_input_stream(infos[1].path) as f:
                return "bad", json.loads(f.read())["reason"]
        return "missing", None

    def write_clips(self, key: str, video_id: str, clips: np.ndarray) -> None:
        table = clips_to_table(video_id, clips)
        self.store.write(self.entry_parts(key), lambda f: pq.write_table(table, f, compression="none"))

    def write_bad(self, key: str, video_id: str, reason: str) -> None:
        body = json.dumps({"video_id": video_id, "reason": reason}).encode()
        self.store.write_bytes(body, *self.entry_parts(key, ".bad.json"))

    def remove(self, key: str, suffix: str) -> None:
        """Remove the entry's file with this suffix (``.bad.json``: its verdict, ``.parquet``: its clips)
        if there is one."""
        path = self.store.path(*self.entry_parts(key, suffix))
        if self.store.fs.get_file_info(path).type == pafs.FileType.File:
            self.store.fs.delete_file(path)

    def read_rows(self, key: str) -> dict:
        """An entry as columns (``video_id``, ``view``, ``clip`` bytes, ``shape``, ``crc32``), like a Ray
        Data batch, verified (``CorruptEntry`` otherwise)."""
        try:
            rows = pq.read_table(self.store.path(*self.entry_parts(key)), filesystem=self.store.fs).to_pydict()
        except (OSError, pa.ArrowException) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise CorruptEntry(key, str(e).splitlines()[0][:200]) from None
        return verify_rows(key, rows)

    def read_clips(self, key: str) -> tuple[list[str], np.ndarray]:
        rows = self.read_rows(key)
        return rows["video_id"], clips_from_batch(rows)

    def size_bytes(self, sub: str | None = None) -> int:
        return self.store.size_bytes(*([sub] if sub else []))
