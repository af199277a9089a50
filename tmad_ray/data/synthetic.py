"""The embedded default dataset: real H.264 MP4s whose label depends on motion only.

Every video shows the same cast on a textured background: two soft blobs (a "pair") and a small
bright particle, with per-frame sensor noise, a flicker of global brightness and occasional 1-px
jolts of the whole frame (camera shake) as distractors. What a single frame shows is drawn
from the same distribution in every class: blob colours, radii, the distance between the two
blobs and every position are uniform over the same ranges, and each class-specific motion is a
triangle or sawtooth wave with a random phase, whose value at a random instant is again uniform
over that range. Only the way things move tells the classes apart (XD-Violence codes):

===== ============== ==========================================================================
code  name           motion
===== ============== ==========================================================================
A     normal         everything drifts slowly (0.2-0.6 px/frame); nothing else changes
B1    fighting       the two blobs strike each other: their distance sweeps between touching
                     and far apart in a fast triangle wave (period 8-14 frames)
B2    shooting       the particle flies fast along a straight line (3-5 px/frame, wrapping)
G     explosion      one blob is a flash: its radius grows from small to large and restarts
                     (sawtooth, period 5-9 frames)
===== ============== ==========================================================================

``make_dataset`` writes ``ROOT/{train,val,test}.csv`` and ``ROOT/videos/*.mp4`` (the layout in docs/guide.md, "Data"),
deterministic from the seed. ``render_video`` is reused by the toy zoo for other motion tasks.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CLASSES = {"A": "normal", "B1": "fighting", "B2": "shooting", "G": "explosion"}
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
MANIFEST = "synth.json"


@dataclass
class Scene:
    """Everything needed to render one video; positions are in pixels, per frame."""

    height: int
    width: int
    frames: int
    background: np.ndarray  # [H, W, 3] float
    pair: np.ndarray  # [F, 2 blobs, 2 (y, x)]
    pair_radius: np.ndarray  # [F, 2]
    pair_color: np.ndarray  # [2, 3]
    particle: np.ndarray  # [F, 2]
    particle_color: np.ndarray  # [3]
    shake: np.ndarray  # [F, 2] integer pixel offsets
    flicker: np.ndarray  # [F]
    noise_seed: int
    noise_sigma: float = 6.0
    extra: dict = field(default_factory=dict)


def _texture(rng, h, w) -> np.ndarray:
    coarse = rng.uniform(30, 110, size=(6, 6, 3))
    ys, xs = np.linspace(0, 5, h), np.linspace(0, 5, w)
    y0, x0 = np.floor(ys).astype(int).clip(0, 4), np.floor(xs).astype(int).clip(0, 4)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    c = coarse
    top = c[y0][:, x0] * (1 - fx) + c[y0][:, x0 + 1] * fx
    bottom = c[y0 + 1][:, x0] * (1 - fx) + c[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _triangle(t, period, phase):
    """Triangle wave in [0, 1]; with a uniform random phase its value is uniform."""
    u = (t / period + phase) % 1.0
    return 1.0 - np.abs(2.0 * u - 1.0)


def _drift(rng, frames, lo, hi, speed):
    """A point drifting at ``speed`` px/frame, reflected inside ``[lo, hi]`` per axis: ``[F, 2]``."""
    start = rng.uniform(lo, hi)
    angle = rng.uniform(0, 2 * np.pi)
    v = speed * np.array([np.sin(angle), np.cos(angle)])
    raw = start + np.arange(frames)[:, None] * v - lo
    span = np.maximum(hi - lo, 1e-6)
    folded = np.mod(raw, 2 * span)
    return lo + np.where(folded > span, 2 * span - folded, folded)


def make_scene(label: str, rng: np.random.Generator, height: int = 64, width: int = 64,
               frames: int = 32) -> Scene:
    """Draw the scene of one video of class ``label`` (see the module docstring)."""
    if label not in CLASSES:
        raise ValueError(f"unknown synthetic class {label!r}; known: {list(CLASSES)}")
    s = min(height, width) / 64.0  # every length below is for 64 px and scales with the frame
    t = np.arange(frames, dtype=float)
    r_lo, r_hi = 3.0 * s, 10.0 * s
    radius = np.tile(rng.uniform(r_lo, r_hi, size=2), (frames, 1))
    gap_lo, gap_hi = 0.0, 22.0 * s  # free space between the two blob edges
    margin = np.array([r_hi + gap_hi / 2 + 2 * s] * 2)
    centre = _drift(rng, frames, margin, np.array([height, width]) - margin, rng.uniform(0.2, 0.6) * s)
    gap = np.full(frames, rng.uniform(gap_lo, gap_hi))
    particle_speed = rng.uniform(0.2, 0.6) * s

    if label == "B1":
        gap = gap_lo + (gap_hi - gap_lo) * _triangle(t, rng.uniform(8, 14), rng.uniform())
    elif label == "G":
        phase, period = rng.uniform(), rng.uniform(5, 9)
        radius[:, 0] = r_lo + (r_hi - r_lo) * ((t / period + phase) % 1.0)
    elif label == "B2":
        particle_speed = rng.uniform(3.0, 5.0) * s

    axis_angle = rng.uniform(0, np.pi)
    axis = np.array([np.sin(axis_angle), np.cos(axis_angle)])
    half = (radius.sum(1) + gap)[:, None] / 2
    pair = np.stack([centre - half * axis, centre + half * axis], axis=1)

    if label == "B2":  # a straight flight, wrapping around the frame
        start = rng.uniform([0, 0], [height, width])
        angle = rng.uniform(0, 2 * np.pi)
        v = particle_speed * np.array([np.sin(angle), np.cos(angle)])
        particle = np.mod(start + t[:, None] * v, [height, width])
    else:
        particle = _drift(rng, frames, np.zeros(2), np.array([height, width], float), particle_speed)

    return Scene(
        height=height, width=width, frames=frames,
        background=_texture(rng, height, width),
        pair=pair, pair_radius=radius,
        pair_color=rng.uniform(120, 255, size=(2, 3)),
        particle=particle, particle_color=rng.uniform(200, 255, size=3),
        # Occasional 1-px jolts of the whole frame (about one frame in four).
        shake=rng.integers(-1, 2, size=(frames, 2)) * (rng.random((frames, 1)) < 0.25),
        flicker=1.0 + rng.normal(0, 0.04, size=frames),
        noise_seed=int(rng.integers(2**31)),
    )


def _disc(yy, xx, centre, radius):
    """Anti-aliased disc coverage in [0, 1], ``[H, W]``."""
    d = np.sqrt((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2)
    return np.clip(radius - d + 0.5, 0.0, 1.0)


def render_video(scene: Scene) -> np.ndarray:
    """The frames of a scene: ``[F, H, W, 3]`` uint8."""
    h, w = scene.height, scene.width
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    noise_rng = np.random.default_rng(scene.noise_seed)
    out = np.empty((scene.frames, h, w, 3), np.uint8)
    for f in range(scene.frames):
        img = scene.background.copy()
        for b in range(2):
            a = _disc(yy, xx, scene.pair[f, b], scene.pair_radius[f, b])[..., None]
            img = img * (1 - a) + scene.pair_color[b] * a
        a = _disc(yy, xx, scene.particle[f], 1.8 * min(h, w) / 64)[..., None]
        img = img * (1 - a) + scene.particle_color * a
        img = np.roll(img, tuple(scene.shake[f]), axis=(0, 1)) * scene.flicker[f]
        img += noise_rng.normal(0, scene.noise_sigma, size=img.shape)
        out[f] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 8) -> None:
    """H.264 (yuv420p) with PyAV; written to a temporary name and renamed when complete."""
    import av

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even frame sizes, got {h}x{w}")
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # x264's lookahead threads make the output (and the decoded pixels) vary from run to
        # run, even with one encoding thread: turn them off so a seed gives identical files.
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "20", "preset": "veryfast",
                          "x264-params": "threads=1:sync-lookahead=0:rc-lookahead=0:mbtree=0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def parse_size(size: str | int) -> tuple[int, int]:
    """``64`` -> (64, 64); ``"240x320"`` -> (240, 320) as (height, width)."""
    if isinstance(size, int) or "x" not in str(size):
        return int(size), int(size)
    h, w = str(size).lower().split("x")
    return int(h), int(w)


def make_dataset(root: str | os.PathLike, seed: int = 0, videos_per_class: int = 24,
                 size: str | int = 64, frames: int = 32, overwrite: bool = False,
                 per_split: dict[str, int] | None = None) -> dict:
    """Write the dataset; returns its description (also saved as ``ROOT/synth.json``).

    ``per_split`` (``{"train": n, "val": n, "test": n}`` videos per class) replaces the 60/20/20
    split of ``videos_per_class``: e.g. few labeled training videos and large val/test sets.
    An existing dataset made with the same parameters is kept as it is.
    """
    root = Path(root)
    if per_split is not None:
        if set(per_split) != set(SPLIT_FRACTIONS) or min(per_split.values()) < 1:
            raise ValueError(f"per_split must give train, val and test counts >= 1, got {per_split}")
        videos_per_class = sum(per_split.values())
    if videos_per_class < 3:
        raise ValueError(f"videos_per_class must be >= 3 (one for each of train, val, test), got {videos_per_class}")
    height, width = parse_size(size)
    params = {"generator": "tmad_ray.synthetic/v1", "seed": seed, "videos_per_class": videos_per_class,
              "height": height, "width": width, "frames": frames, "classes": CLASSES,
              **({"per_split": dict(per_split)} if per_split else {})}
    described = root / MANIFEST
    if described.is_file() and not overwrite:
        if json.loads(described.read_text()) == params:
            return params
        raise FileExistsError(f"{root} holds a different synthetic dataset; pass --overwrite or another OUT")
    if root.exists():
        if not overwrite and any(root.iterdir()):
            raise FileExistsError(f"{root} exists and is not a synthetic dataset; choose another OUT")
        shutil.rmtree(root)
    tmp = root.with_name(f".{root.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "videos").mkdir(parents=True)

    lines = {split: [] for split in SPLIT_FRACTIONS}
    for ci, label in enumerate(CLASSES):
        n_val = per_split["val"] if per_split else max(1, round(videos_per_class * SPLIT_FRACTIONS["val"]))
        n_test = per_split["test"] if per_split else max(1, round(videos_per_class * SPLIT_FRACTIONS["test"]))
        for i in range(videos_per_class):
            rng = np.random.default_rng([seed, ci, i])
            scene = make_scene(label, rng, height, width, frames)
            name = f"videos/{label}_{i:04d}.mp4"
            write_mp4(tmp / name, render_video(scene))
            split = "val" if i < n_val else "test" if i < n_val + n_test else "train"
            lines[split].append(f"{name} {label}")
    for split, rows in lines.items():
        (tmp / f"{split}.csv").write_text("\n".join(rows) + "\n")
    (tmp / MANIFEST).write_text(json.dumps(params, indent=1))
    os.replace(tmp, root)
    return params


def ensure_synthetic(data_cfg) -> None:
    """Write the embedded dataset into ``data.root`` when the config asks for one (idempotent)."""
    if data_cfg.synthetic is None:
        return
    s = data_cfg.synthetic
    make_dataset(data_cfg.root, seed=s.seed, videos_per_class=s.videos_per_class, size=s.size, frames=s.frames,
                 per_split=s.per_split)
