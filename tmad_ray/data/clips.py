"""One video -> uint8 clips ``T,H,W,C`` (decord), with the frame sampling of VideoMAE / AMD.

Pure parts (index sampling, crop boxes) are separate from decoding so they can be tested alone.

* ``stride`` (Kinetics style): ``num_frames`` frames ``sampling_rate`` apart. Train: a random
  start; eval: ``eval_clips`` starts spread evenly over the video.
* ``segment`` (TSN style, Something-Something): the video is cut into ``num_frames`` equal
  segments, one frame per segment. Train: a random frame in each; eval: ``eval_clips`` evenly
  shifted picks.

Videos shorter than a clip repeat indices (clamped to the last frame for ``stride``; segments
shorter than a frame share frames for ``segment``).

Spatially, eval views resize the short side to ``image_size`` and take ``eval_crops`` crops
(1: centre; 3: both ends and centre of the long side). Train views resize the short side to
``train_short_side`` and keep the centre square, so the worker can take a fresh random crop of
``image_size`` (and flip) every epoch.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Test-only: paths (comma-separated prefixes) a node's Ray workers pretend not to see, set in that
# node's environment by a test's two-node cluster (on one machine every node shares one disk).
HIDE_ENV = "TMAD_RAY_TEST_HIDDEN_PATHS"


class BadVideo(Exception):
    """A video that cannot be used; ``str(e)`` is the reason recorded in the data report."""


class UnreadableVideo(BadVideo):
    """A file this process could not read (missing, no permission, an I/O error): a fact about the
    node's view of the storage, not a verdict on the video, so it is never cached as bad."""


@dataclass(frozen=True)
class ViewSpec:
    """Everything that decides the clips of one video; part of the clip-cache key."""

    mode: str  # "train" | "eval"
    num_frames: int
    sampling: str  # "stride" | "segment"
    sampling_rate: int
    image_size: int
    train_short_side: int
    train_views: int
    eval_clips: int
    eval_crops: int
    seed: int

    @classmethod
    def from_config(cls, data_cfg, mode: str) -> "ViewSpec":
        return cls(mode=mode, num_frames=data_cfg.num_frames, sampling=data_cfg.sampling,
                   sampling_rate=data_cfg.sampling_rate, image_size=data_cfg.image_size,
                   train_short_side=data_cfg.train_short_side, train_views=data_cfg.cached_train_views,
                   eval_clips=data_cfg.eval_clips, eval_crops=data_cfg.eval_crops, seed=data_cfg.seed)

    @property
    def num_views(self) -> int:
        return self.train_views if self.mode == "train" else self.eval_clips * self.eval_crops

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        side = self.train_short_side if self.mode == "train" else self.image_size
        return (self.num_frames, side, side, 3)


# ---------------------------------------------------------------- index sampling (pure)

def stride_indices(n: int, num_frames: int, rate: int, start: int) -> np.ndarray:
    return np.clip(start + np.arange(num_frames) * rate, 0, n - 1)


def sample_train_indices(n: int, num_frames: int, sampling: str, rate: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Random frame indices ``[num_frames]`` of a video with ``n`` frames."""
    if n < 1:
        raise BadVideo("video has no frames")
    if sampling == "stride":
        span = (num_frames - 1) * rate + 1
        start = int(rng.integers(0, n - span + 1)) if n > span else 0
        return stride_indices(n, num_frames, rate, start)
    if sampling == "segment":
        edges = np.linspace(0, n, num_frames + 1)
        lo, hi = np.floor(edges[:-1]), np.maximum(np.floor(edges[1:]), np.floor(edges[:-1]) + 1)
        return np.minimum(lo + np.floor(rng.random(num_frames) * (hi - lo)), n - 1).astype(np.int64)
    raise ValueError(f"unknown sampling {sampling!r} (stride | segment)")


def sample_eval_indices(n: int, num_frames: int, sampling: str, rate: int, num_clips: int) -> np.ndarray:
    """Deterministic frame indices ``[num_clips, num_frames]``."""
    if n < 1:
        raise BadVideo("video has no frames")
    if sampling == "stride":
        span = (num_frames - 1) * rate + 1
        room = max(n - span, 0)
        starts = [room // 2] if num_clips == 1 else [round(c * room / (num_clips - 1)) for c in range(num_clips)]
        return np.stack([stride_indices(n, num_frames, rate, s) for s in starts])
    if sampling == "segment":
        tick = n / num_frames
        out = [np.floor(tick * (c + 0.5) / num_clips + tick * np.arange(num_frames)) for c in range(num_clips)]
        return np.minimum(np.stack(out), n - 1).astype(np.int64)
    raise ValueError(f"unknown sampling {sampling!r} (stride | segment)")


def view_rng(path: str, seed: int) -> np.random.Generator:
    """A generator that depends only on the video and the seed, so train views are reproducible."""
    return np.random.default_rng([seed, zlib.crc32(os.path.basename(path).encode())])


# ---------------------------------------------------------------- spatial (pure)

def resized_size(h: int, w: int, short: int) -> tuple[int, int]:
    if h <= w:
        return short, max(short, round(w * short / h))
    return max(short, round(h * short / w)), short


def crop_offsets(h: int, w: int, size: int, num_crops: int) -> list[tuple[int, int]]:
    """Top-left corners of ``num_crops`` square crops along the long side."""
    if num_crops == 1:
        return [((h - size) // 2, (w - size) // 2)]
    if h >= w:
        return [(y, (w - size) // 2) for y in (0, (h - size) // 2, h - size)]
    return [((h - size) // 2, x) for x in (0, (w - size) // 2, w - size)]


def resize_frames(frames: np.ndarray, short: int) -> np.ndarray:
    """``[T,H,W,3]`` uint8 -> short side ``short`` (bilinear with antialiasing, PIL)."""
    h, w = frames.shape[1:3]
    nh, nw = resized_size(h, w, short)
    if (nh, nw) == (h, w):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((nw, nh), Image.BILINEAR)) for f in frames])


# ---------------------------------------------------------------- decoding

def _mp4_truncation(path: str, size: int) -> str | None:
    """Walk the top-level boxes of an MP4/MOV file; a box that runs past EOF means truncation."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8 or head[4:8] != b"ftyp":
            return None  # not an ISO-BMFF file: let the decoder judge it
        pos = 0
        while pos < size:
            f.seek(pos)
            hdr = f.read(16)
            if len(hdr) < 8:
                return f"truncated: box header cut at byte {pos} of {size}"
            box_size = int.from_bytes(hdr[:4], "big")
            kind = hdr[4:8].decode("latin-1")
            if box_size == 1 and len(hdr) == 16:
                box_size = int.from_bytes(hdr[8:16], "big")
            elif box_size == 0:  # box runs to EOF by definition
                return None
            if box_size < 8:
                return f"corrupt: box {kind!r} at byte {pos} has size {box_size}"
            if pos + box_size > size:
                return f"truncated: box {kind!r} ends at byte {pos + box_size} but the file has {size} bytes"
            pos += box_size
    return None


def open_video(path: str):
    """Open with decord after cheap checks; raises ``BadVideo`` with the reason."""
    import decord

    try:
        if any(path.startswith(h) for h in os.environ.get(HIDE_ENV, "").split(",") if h):
            raise FileNotFoundError(2, "No such file or directory")  # another node's disk, in a test
        size = os.path.getsize(path)
        if not os.access(path, os.R_OK):
            raise PermissionError(13, "Permission denied")
        truncated = _mp4_truncation(path, size) if size else None
    except OSError as e:
        raise UnreadableVideo(f"cannot read the file on this node ({e.strerror})") from None
    if size == 0:
        raise BadVideo("zero-byte file")
    if truncated:
        raise BadVideo(truncated)
    try:
        reader = decord.VideoReader(path, num_threads=1)
    except Exception as e:  # decord raises RuntimeError / DECORDError with FFmpeg's message
        raise BadVideo(f"unreadable: {str(e).splitlines()[0][:200]}") from None
    if len(reader) == 0:
        raise BadVideo("zero frames")
    return reader


def read_frames(reader, indices: np.ndarray) -> np.ndarray:
    """Frames at ``indices`` as ``[N,H,W,3]`` uint8, full resolution."""
    try:
        frames = reader.get_batch(list(map(int, indices))).asnumpy()
    except Exception as e:
        raise BadVideo(f"decode failed at frames {int(indices.min())}..{int(indices.max())}: "
                       f"{str(e).splitlines()[0][:200]}") from None
    # decord has returned 4-channel frames for some tiny frame sizes: never pass those on.
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise BadVideo(f"decoder returned frames of shape {frames.shape} for {len(indices)} RGB frames")
    return frames


def probe_video(path: str) -> int:
    """Open the video and decode its first and last frame; returns the frame count."""
    reader = open_video(path)
    try:
        n = len(reader)
        read_frames(reader, np.array([0, n - 1]))
        return n
    finally:
        del reader


def decode_views(path: str, spec: ViewSpec) -> np.ndarray:
    """All clips of one video: ``[num_views, T, S, S, 3]`` uint8 (S: see ``ViewSpec.clip_shape``)."""
    reader = open_video(path)
    try:
        n = len(reader)
        if spec.mode == "train":
            rng = view_rng(path, spec.seed)
            index_sets = np.stack([
                sample_train_indices(n, spec.num_frames, spec.sampling, spec.sampling_rate, rng)
                for _ in range(spec.train_views)
            ])
        else:
            index_sets = sample_eval_indices(n, spec.num_frames, spec.sampling, spec.sampling_rate, spec.eval_clips)
        # One decode of the union of indices; decord seeks efficiently for sorted indices.
        wanted = np.unique(index_sets)
        frames = read_frames(reader, wanted)
    finally:
        del reader  # closes the file
    # Resize each decoded frame once, even when clips overlap.
    side = spec.train_short_side if spec.mode == "train" else spec.image_size
    frames = resize_frames(frames, side)
    position = {int(i): k for k, i in enumerate(wanted)}
    crops = crop_offsets(*frames.shape[1:3], side, 1 if spec.mode == "train" else spec.eval_crops)
    clips = [frames[[position[int(i)] for i in indices], y:y + side, x:x + side]
             for indices in index_sets for y, x in crops]
    return np.ascontiguousarray(np.stack(clips))
