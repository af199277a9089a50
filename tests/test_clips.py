import av
import numpy as np
import pytest

from tmad_ray.data.clips import (BadVideo, UnreadableVideo, ViewSpec, crop_offsets, decode_views, open_video, probe_video,
                                 read_frames, sample_eval_indices, sample_train_indices)
from tmad_ray.data.synthetic import make_scene, render_video, write_mp4


def spec(mode, **kw):
    base = dict(mode=mode, num_frames=8, sampling="stride", sampling_rate=2, image_size=32, train_short_side=40,
                train_views=3, eval_clips=2, eval_crops=3, seed=0)
    return ViewSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 48x64 (non-square) 24-frame H.264 video."""
    path = tmp_path_factory.mktemp("v") / "v.mp4"
    write_mp4(path, render_video(make_scene("B1", np.random.default_rng(0), 48, 64, 24)))
    return str(path)


def test_stride_train_indices():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(50):
        idx = sample_train_indices(100, 8, "stride", 4, rng)
        assert len(idx) == 8 and idx.min() >= 0 and idx.max() < 100
        assert (np.diff(idx) == 4).all()
        starts.add(int(idx[0]))
    assert len(starts) > 10  # random views


def test_short_video_repeats_indices():
    rng = np.random.default_rng(0)
    idx = sample_train_indices(5, 8, "stride", 2, rng)
    assert idx.tolist() == [0, 2, 4, 4, 4, 4, 4, 4]
    seg = sample_train_indices(5, 8, "segment", 1, rng)
    assert len(seg) == 8 and seg.max() <= 4 and (np.diff(seg) >= 0).all()
    assert sample_eval_indices(3, 4, "segment", 1, 1).tolist() == [[0, 1, 1, 2]]


def test_segment_takes_one_frame_per_segment():
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = sample_train_indices(64, 8, "segment", 1, rng)
        assert ((idx // 8) == np.arange(8)).all()


def test_eval_indices_are_deterministic_and_spread():
    a = sample_eval_indices(100, 8, "stride", 4, 3)
    assert a.shape == (3, 8) and (a == sample_eval_indices(100, 8, "stride", 4, 3)).all()
    assert a[0, 0] == 0 and a[-1, -1] == 99 and a[1, 0] == 36
    s = sample_eval_indices(64, 8, "segment", 1, 2)
    assert s.tolist() == [[2, 10, 18, 26, 34, 42, 50, 58], [6, 14, 22, 30, 38, 46, 54, 62]]


def test_three_crops_run_along_the_long_side():
    assert crop_offsets(32, 48, 32, 3) == [(0, 0), (0, 8), (0, 16)]
    assert crop_offsets(48, 32, 32, 3) == [(0, 0), (8, 0), (16, 0)]
    assert crop_offsets(48, 32, 32, 1) == [(8, 0)]


def test_decord_frames_equal_pyav_frames(video):
    indices = np.array([0, 3, 7, 12, 23])
    ours = read_frames(open_video(video), indices)
    with av.open(video) as c:
        theirs = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert theirs.shape == (24, 48, 64, 3)
    np.testing.assert_array_equal(ours, theirs[indices])


def test_decode_views_shapes_and_reproducible_train_views(video):
    train = decode_views(video, spec("train"))
    assert train.shape == (3, 8, 40, 40, 3) and train.dtype == np.uint8
    np.testing.assert_array_equal(train, decode_views(video, spec("train")))
    assert not np.array_equal(train, decode_views(video, spec("train", seed=1)))
    ev = decode_views(video, spec("eval"))
    assert ev.shape == (6, 8, 32, 32, 3)
    # Views are clip-major: the 3 crops of clip 0 share frames, shifted along the width
    # (48x64 resized to 32x43, centre crop at x=5).
    assert crop_offsets(32, 43, 32, 3)[1] == (0, 5)
    np.testing.assert_array_equal(ev[0][:, :, 5:], ev[1][:, :, :27])
    assert not np.array_equal(ev[0], ev[3])  # clip 1 starts at other frames


def test_bad_videos_say_why(tmp_path, video):
    data = open(video, "rb").read()
    cases = {
        "zero.mp4": (b"", "zero-byte"),
        "half.mp4": (data[: len(data) // 2], "truncated"),
        "junk.mp4": (b"not a video at all" * 100, "unreadable"),
    }
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(BadVideo, match=reason):
            probe_video(str(tmp_path / name))
    with pytest.raises(UnreadableVideo, match="cannot read the file on this node .No such file"):
        probe_video(str(tmp_path / "nope.mp4"))
    assert probe_video(video) == 24


def test_truncated_faststart_mp4_is_detected(tmp_path):
    frames = render_video(make_scene("A", np.random.default_rng(1), 32, 32, 16))
    path = tmp_path / "fs.mp4"
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    assert probe_video(str(path)) == 16
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.7)])
    with pytest.raises(BadVideo, match="truncated: box 'mdat'"):
        probe_video(str(path))
