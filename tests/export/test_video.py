import numpy as np
import pytest
import torch

from avatar.export.video import render_motion_video, write_video

av = pytest.importorskip("av")


def _read(path):
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        return frames, c.streams.video[0].codec_context.name


def test_write_video_round_trip(tmp_path):
    frames = [np.full((32, 48, 3), 20 * i, np.uint8) for i in range(10)]
    info = write_video(tmp_path / "v.mp4", frames, fps=10)
    back, codec = _read(info.path)
    assert len(back) == 10 == info.num_frames and back[0].shape == (32, 48, 3)
    assert codec in ("h264", "mpeg4") and not info.padded
    assert abs(float(back[5].mean()) - 100) < 3  # flat grey survives lossy coding
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_mpeg4_fallback_and_odd_size(tmp_path):
    info = write_video(tmp_path / "o.mp4", [np.zeros((31, 45, 3), np.uint8)] * 3, fps=5, codec="mpeg4")
    back, codec = _read(info.path)
    assert codec == "mpeg4" and len(back) == 3 and back[0].shape == (32, 46, 3) and info.padded


def test_render_motion_video(tmp_path):
    poses = [torch.tensor(float(i)) for i in range(6)]
    info = render_motion_video(tmp_path / "m.mp4", lambda p: torch.full((24, 24, 3), float(p) / 10), poses, fps=12)
    back, _ = _read(info.path)
    assert len(back) == 6 and back[0].shape == (24, 24, 3)


def test_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "e.mp4", [], fps=5)
    with pytest.raises(ValueError, match="frame 1 is"):
        write_video(tmp_path / "e.mp4", [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)], fps=5)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "e.mp4", [np.zeros((8, 8, 3), np.float64)], fps=5)
    assert not list(tmp_path.iterdir())
