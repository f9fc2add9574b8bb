"""avatar.data.video: decoding, subsampling, downscaling, time ranges and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from avatar.data.video import probe_video, read_video
from avatar.export.video import write_video


def _clip(path, n=30, w=64, h=48, fps=10):
    frames = []
    for i in range(n):
        img = np.zeros((h, w, 3), np.uint8)
        img[:, : 2 * i % w] = 200  # a bar that grows: frames are distinguishable
        frames.append(img)
    write_video(path, frames, fps=fps)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return _clip(tmp_path_factory.mktemp("video") / "clip.mp4")


def test_probe(clip):
    info = probe_video(clip)
    assert (info.width, info.height) == (64, 48)
    assert info.fps == pytest.approx(10.0)
    assert info.frames == 30
    assert info.duration == pytest.approx(3.0, abs=0.15)


def test_read_all_frames(clip):
    v = read_video(clip, max_frames=100, max_side=1000, progress=False)
    assert v.images.shape == (30, 48, 64, 3) and v.images.dtype == np.uint8
    assert v.scale == 1.0 and v.messages == []
    assert np.all(np.diff(v.timestamps) > 0)
    np.testing.assert_allclose(v.timestamps, np.arange(30) / 10.0, atol=1e-6)
    np.testing.assert_array_equal(v.indices, np.arange(30))


def test_subsample_and_downscale(clip):
    v = read_video(clip, max_frames=10, max_side=32, progress=False)
    assert v.num_frames == 10
    assert max(v.width, v.height) <= 32 and v.width % 2 == 0 and v.height % 2 == 0
    np.testing.assert_array_equal(v.indices, np.arange(0, 30, 3))
    assert any("subsampled 30 frames to 10" in m for m in v.messages)
    assert any("downscaled 64x48" in m for m in v.messages)


def test_time_range(clip):
    v = read_video(clip, start=1.0, end=2.0, max_frames=100, progress=False)
    assert v.indices.tolist() == list(range(10, 20))
    with pytest.raises(ValueError, match="no decodable frame between"):
        read_video(clip, start=50.0, progress=False)
    with pytest.raises(ValueError, match="time range"):
        read_video(clip, start=2.0, end=1.0, progress=False)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mp4: the file is empty"):
        read_video(empty)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    with pytest.raises(ValueError, match="notes.mp4: not a readable video"):
        read_video(text)
    with pytest.raises(ValueError, match="is not a file"):
        read_video(tmp_path)
    png = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    v = read_video(png, progress=False)  # ffmpeg reads a single image as a one-frame video: that is not an error here
    assert v.num_frames == 1
