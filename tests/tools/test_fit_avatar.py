"""End-to-end: ``fit_avatar --demo`` on a tiny subject for each preset, then its outputs; bad inputs."""

import json

import pytest
import torch

from avatar.export.bundle import load_bundle
from avatar.export.ply import read_splat_ply
from tools.fit_avatar import FitAvatarArgs, run


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory, anny_body):
    out = tmp_path_factory.mktemp("fit")
    summary = run(FitAvatarArgs(demo=True, out=out, demo_frames=4, demo_size=48, steps=6, progress=False,
                                geometry_frames=2))
    return out, summary


def test_demo_writes_everything(tiny_demo):
    out, summary = tiny_demo
    for name in ("summary.json", "canonical.ply", "posed.ply", "motion.mp4", "eval/metrics.json", "eval/report.md",
                 "eval/grid.png", "avatar/avatar.json", "avatar/avatar.safetensors"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["train_frames"] == 4 and set(on_disk["metrics"]) == {"novel_view", "novel_pose"}
    for split in on_disk["metrics"].values():
        assert 5.0 < split["psnr"] < 60.0 and 0.0 < split["ssim"] <= 1.0
    geometry = on_disk["metrics"]["novel_view"]["geometry"]  # the first 2 posed frames are measured
    assert geometry["num_frames"] == 2 and geometry["chamfer_mm"] > 0
    assert "skinning" in on_disk["ms_per_step_by_stage"] and "backward" in on_disk["ms_per_step_by_stage"]
    assert summary["lpips"]  # a value's source or the reason it is unavailable


def test_exports_reload(tiny_demo):
    out, summary = tiny_demo
    bundle = load_bundle(out / "avatar")
    ply = read_splat_ply(out / "canonical.ply")
    assert len(ply) == len(bundle.gaussians) == summary["gaussians"]
    torch.testing.assert_close(ply.means, bundle.gaussians.means)
    assert bundle.body_model_name == "anny" and len(bundle.bone_names) == 104


def test_resume_continues_from_the_checkpoint(tiny_demo):
    out, _ = tiny_demo
    again = run(FitAvatarArgs(demo=True, out=out, demo_frames=4, demo_size=48, steps=6, resume=True, progress=False,
                               geometry_frames=0))
    assert again["fit_seconds"] < 30  # nothing left to train: the final checkpoint is loaded


@pytest.mark.parametrize("preset", ["quality"])
def test_other_preset_runs(tmp_path, anny_body, preset):
    s = run(FitAvatarArgs(demo=True, out=tmp_path, demo_frames=3, demo_size=32, steps=3, preset=preset,
                          progress=False, device="cpu", geometry_frames=0))  # an explicit device takes the moving code path
    assert s["preset"] == preset and s["gaussians"] > 0


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="either --demo or --data"):
        run(FitAvatarArgs(out=tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run(FitAvatarArgs(data=tmp_path / "nowhere", out=tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a known dataset layout"):
        run(FitAvatarArgs(data=tmp_path / "empty", out=tmp_path / "o"))
