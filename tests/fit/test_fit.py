"""End-to-end: a few steps of the fitting job on a tiny synthetic subject (3 frames, 48x48)."""

import dataclasses

import pytest
import torch

from avatar.data import AvatarDataset, SyntheticConfig, make_subject, write_peoplesnapshot
from avatar.fit import DensifyConfig, FitConfig, fast_config, fit_subject, quality_config
from avatar.fit.checkpoint import list_checkpoints
from avatar.fit.trainer import exponential_lr, frame_index


@pytest.fixture(scope="module")
def tiny_frames(anny_body, tmp_path_factory):
    cfg = SyntheticConfig(seed=3, motion="turn", rig="mono", cameras=(0,), num_frames=3, width=48, height=48,
                          texture_size=64)
    folder = write_peoplesnapshot(make_subject(cfg, anny_body), anny_body, tmp_path_factory.mktemp("subj"),
                                  progress=False)
    ds = AvatarDataset(folder, resolution=None, body_model=anny_body)
    return [ds[i] for i in range(len(ds))]


def small(**kw) -> FitConfig:
    base = FitConfig(steps=30, num_gaussians=1, backend="cpu", checkpoint_every=0, lr_scale=3.0,
                     densify=DensifyConfig(start=1000, stop=1000), background="black", init_color_frames=3)
    return dataclasses.replace(base, **kw)


def test_schedule_helpers():
    assert abs(exponential_lr(0, 100, 1e-2, 1e-4) - 1e-2) < 1e-12
    assert abs(exponential_lr(50, 100, 1e-2, 1e-4) - 1e-3) < 1e-12
    assert abs(exponential_lr(100, 100, 1e-2, 1e-4) - 1e-4) < 1e-12
    # every epoch visits every frame once
    assert sorted(frame_index(s, 5, 0) for s in range(1, 6)) == list(range(5))
    assert sorted(frame_index(s, 5, 0) for s in range(6, 11)) == list(range(5))
    with pytest.raises(ValueError, match="background"):
        FitConfig(background="green").validate()


def test_fit_decreases_the_loss(tiny_frames, anny_body, tmp_path):
    r = fit_subject(tiny_frames, anny_body, small(), tmp_path, progress=False)
    loss = [h["loss"] for h in r.history]
    p = [h["psnr"] for h in r.history]
    assert len(r.history) == 30
    first, last = sum(loss[:3]) / 3, sum(loss[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    assert sum(p[-3:]) / 3 > sum(p[:3]) / 3 + 1.0
    for key in ("t_skinning", "t_render", "t_loss", "t_backward", "t_optimizer", "t_densify"):
        assert key in r.history[0]
    assert r.checkpoint is not None and r.checkpoint.exists()
    c = r.avatar.canonical()
    assert c.colors.min() >= 0 and c.colors.max() <= 1


def test_resume_is_bit_identical(tiny_frames, anny_body, tmp_path):
    cfg = small(steps=8, checkpoint_every=3, pose_refine=True, background="random", backend="cpu",
                densify=DensifyConfig(start=2, stop=7, interval=2, grad_threshold=1e-6, max_gaussians=15_000))
    full = fit_subject(tiny_frames, anny_body, cfg, tmp_path / "a", progress=False)

    class Killed(Exception):
        pass

    def kill_at_5(trainer, ctx):
        if ctx.step == 5:
            raise Killed

    with pytest.raises(Killed):
        fit_subject(tiny_frames, anny_body, cfg, tmp_path / "b", progress=False, callbacks=[kill_at_5])
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")][-1] == "step_00000003.json"
    resumed = fit_subject(tiny_frames, anny_body, cfg, tmp_path / "b", resume=True, progress=False)
    assert [h["step"] for h in resumed.history] == list(range(1, 9))
    assert full.avatar.num_gaussians > 13_718  # densification ran
    a, b = full.avatar.state_dict(), resumed.avatar.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k, v in full.refiner.state_dict().items():
        assert torch.equal(v, resumed.refiner.state_dict()[k]), k
    assert float(full.refiner.rot_deltas.detach().abs().max()) > 0
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    with pytest.raises(ValueError, match="different FitConfig"):
        fit_subject(tiny_frames, anny_body, dataclasses.replace(cfg, seed=5), tmp_path / "b", resume=True,
                    progress=False)


@pytest.mark.parametrize("preset", [fast_config, quality_config])
def test_presets_run(preset, tiny_frames, anny_body, tmp_path):
    cfg = preset(steps=3, num_gaussians=1, backend="cpu", checkpoint_every=2)
    r = fit_subject(tiny_frames, anny_body, cfg, tmp_path, progress=True, device="cpu")
    assert len(r.history) == 3 and all(h["loss"] > 0 for h in r.history)
    assert (r.refiner is not None) == cfg.pose_refine


def test_downscale_frame_scales_image_and_intrinsics(tiny_frames):
    from avatar.fit.job import downscale_frame
    from avatar.geometry import project_points

    f = tiny_frames[0]
    d = downscale_frame(f, 2)
    assert d.image.shape == (24, 24, 3) and d.mask.shape == (24, 24) and d.camera.width == 24
    torch.testing.assert_close(d.image.mean(), f.image.mean(), atol=1e-5, rtol=0)
    pts = torch.tensor([[0.1, 0.2, 0.3], [-0.2, 0.0, 1.0]])
    uv, _ = project_points(pts, f.camera.viewmats, f.camera.Ks)
    uv2, _ = project_points(pts, d.camera.viewmats, d.camera.Ks)
    torch.testing.assert_close(uv2, uv / 2)
    assert downscale_frame(f, 1) is f
