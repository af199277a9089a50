"""The clip cache: decoded clips in Parquet, one entry per video, on local disk or any URI.

An entry's key hashes the video's path, size and mtime and every decode parameter
(``ViewSpec``), so a second run decodes nothing and a changed or added video decodes only
itself. Entries are written under a temporary name and moved into place when complete: a
reader lists only final names, so a half-written entry is never read (on object stores a
single-object write is atomic too).

Entry layout (``<cache>/<key[:2]>/<key>.parquet``), one row per view::

    video_id: string   the path relative to the dataset root
    view:     int32    view index (train: temporal view; eval: clip * crops + crop)
    clip:     binary   uint8 T*H*W*C bytes (raw bytes + a fixed shape read back faster than
                       Arrow's tensor extension)
    shape:    list<int32>  [T, H, W, C]

A video that cannot be decoded leaves ``<key>.bad.json`` with the reason, so later runs skip
it without decoding again; the verdict goes when the file changes (its key changes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tmad_ray.data.clips import ViewSpec

CACHE_FORMAT = 1
SCHEMA = pa.schema([("video_id", pa.string()), ("view", pa.int32()), ("clip", pa.binary()),
                    ("shape", pa.list_(pa.int32()))])


def video_key(abspath: str, spec: ViewSpec) -> str:
    """Content-addressed key of one video's clips; raises ``FileNotFoundError`` if it is gone."""
    st = os.stat(abspath)
    ident = {"format": CACHE_FORMAT, "path": os.path.abspath(abspath), "size": st.st_size,
             "mtime_ns": st.st_mtime_ns, "spec": dataclasses.asdict(spec)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def clips_to_table(video_id: str, clips: np.ndarray) -> pa.Table:
    """``[V, T, H, W, C]`` uint8 -> an entry table of V rows."""
    if clips.dtype != np.uint8 or clips.ndim != 5:
        raise ValueError(f"expected uint8 [V,T,H,W,C] clips, got {clips.dtype} {clips.shape}")
    shape = list(clips.shape[1:])
    return pa.table({
        "video_id": [video_id] * len(clips),
        "view": np.arange(len(clips), dtype=np.int32),
        "clip": [c.tobytes() for c in clips],
        "shape": [shape] * len(clips),
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
        if "://" in uri:
            self.fs, self.base = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.base = pafs.LocalFileSystem(), os.path.abspath(uri)
        self.uri = uri
        self.fs.create_dir(self.base, recursive=True)

    def __reduce__(self):  # ship the URI to Ray tasks, not the filesystem handle
        return (ClipCache, (self.uri,))

    def _path(self, key: str, suffix: str) -> str:
        return f"{self.base}/{key[:2]}/{key}{suffix}"

    def entry_path(self, key: str) -> str:
        return self._path(key, ".parquet")

    def entry_uri(self, key: str) -> str:
        """What ``ray.data.read_parquet`` should be given for this entry."""
        path = self.entry_path(key)
        return path if "://" not in self.uri else f"{self.uri.split('://')[0]}://{path}"

    def lookup(self, key: str) -> tuple[str, str | None]:
        """``("clips", None)``, ``("bad", reason)`` or ``("missing", None)``."""
        infos = self.fs.get_file_info([self.entry_path(key), self._path(key, ".bad.json")])
        if infos[0].type == pafs.FileType.File:
            return "clips", None
        if infos[1].type == pafs.FileType.File:
            with self.fs.open_input_stream(infos[1].path) as f:
                return "bad", json.loads(f.read())["reason"]
        return "missing", None

    def _atomic_write(self, final: str, write) -> None:
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        tmp = f"{final}.{uuid.uuid4().hex}.tmp"
        try:
            with self.fs.open_output_stream(tmp) as f:
                write(f)
            self.fs.move(tmp, final)
        except BaseException:
            if self.fs.get_file_info(tmp).type == pafs.FileType.File:
                self.fs.delete_file(tmp)
            raise

    def write_clips(self, key: str, video_id: str, clips: np.ndarray) -> None:
        table = clips_to_table(video_id, clips)
        self._atomic_write(self.entry_path(key), lambda f: pq.write_table(table, f, compression="none"))

    def write_bad(self, key: str, video_id: str, reason: str) -> None:
        body = json.dumps({"video_id": video_id, "reason": reason}).encode()
        self._atomic_write(self._path(key, ".bad.json"), lambda f: f.write(body))

    def read_rows(self, key: str) -> dict:
        """An entry as columns (``video_id``, ``view``, ``clip`` bytes, ``shape``), like a Ray Data batch."""
        return pq.read_table(self.entry_path(key), filesystem=self.fs).to_pydict()

    def read_clips(self, key: str) -> tuple[list[str], np.ndarray]:
        rows = self.read_rows(key)
        return rows["video_id"], clips_from_batch(rows)

    def write_blob(self, relpath: str, body: bytes) -> None:
        """Any file under the cache (written atomically), e.g. frozen-model targets."""
        self._atomic_write(f"{self.base}/{relpath}", lambda f: f.write(body))

    def read_blob(self, relpath: str) -> bytes | None:
        path = f"{self.base}/{relpath}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def size_bytes(self, sub: str | None = None) -> int:
        sel = pafs.FileSelector(f"{self.base}/{sub}" if sub else self.base, recursive=True, allow_not_found=True)
        return sum(i.size for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)
