import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from avatar.data.frames import Frame
from avatar.eval.metrics import LpipsStatus, psnr
from avatar.eval.report import composite, error_heatmap, evaluate
from avatar.types import BodyPose, Cameras

H, W = 40, 32


def _frame(gen, fid, cam="1"):
    image = torch.rand(H, W, 3, generator=gen)
    mask = torch.zeros(H, W)
    mask[8:34, 6:26] = 1
    cams = Cameras(torch.eye(4), torch.tensor([[50.0, 0, 16], [0, 50, 20], [0, 0, 1]]), W, H)
    return Frame(image, mask, cams, BodyPose.zeros(4), torch.zeros(10), "anny", fid, cam)


def _render_perfect(frame):
    # premultiplied render over black: exactly the masked ground truth
    return frame.image * frame.mask[..., None], frame.mask


def _render_offset(frame):
    rgb, a = _render_perfect(frame)
    return (rgb + 0.1 * a[..., None]).clamp(0, 1), a


def test_composite():
    img, a, bg = torch.full((2, 2, 3), 0.5), torch.tensor([[1.0, 0.0], [0.5, 0.25]]), torch.tensor([1.0, 0.0, 0.0])
    out = composite(img, a, bg)
    assert torch.allclose(out[0, 0], torch.tensor([0.5, 0.5, 0.5]))
    assert torch.allclose(out[0, 1], bg)
    assert torch.allclose(out[1, 0], torch.tensor([0.75, 0.25, 0.25]))
    assert torch.allclose(composite(img * a[..., None], a, bg, premultiplied=True), out)


def test_error_heatmap_colours():
    gt = torch.zeros(2, 2, 3)
    pred = torch.tensor([[0.0, 1.0], [0.125, 0.25]])[..., None].expand(2, 2, 3)
    hm = error_heatmap(pred, gt, scale=0.25)
    assert hm.dtype == np.uint8 and hm.shape == (2, 2, 3)
    assert hm[0, 0].tolist() == [0, 0, 4] and hm[0, 1].tolist() == [252, 255, 164] == hm[1, 1].tolist()


def test_evaluate_writes_reports(gen, tmp_path):
    frames = {"novel_view": [_frame(gen, i * 30, "2") for i in range(4)],
              "novel_pose": [_frame(gen, 500 + i * 30, "4") for i in range(2)]}
    geo_calls = []

    def geometry_fn(frame):
        if frame.frame_id >= 500:
            return None
        geo_calls.append(frame.frame_id)
        v = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float32)
        centres = torch.tensor([[0.2, 0.2, 0.01], [0.1, 0.5, 0.01]])  # 10 mm above the triangle
        return centres, v, torch.tensor([[0, 1, 2]])

    rep = evaluate(_render_offset, frames, out_dir=tmp_path, grid_frames_per_split=2, geometry_fn=geometry_fn,
                   geometry_samples=500, background=(0.0, 0.0, 0.0))
    assert geo_calls == [0, 30, 60, 90]
    assert len(rep.frames) == 6 and set(rep.splits) == {"novel_view", "novel_pose"}
    nv = rep.splits["novel_view"]
    assert nv.num_frames == 4 and rep.splits["novel_pose"].num_frames == 2
    # frame 0 against a direct PSNR of the composited images
    f0 = frames["novel_view"][0]
    gt = f0.image * f0.mask[..., None]
    assert rep.frames[0].psnr == pytest.approx(float(psnr(_render_offset(f0)[0], gt)), abs=1e-4)
    assert 15 < nv.psnr < 40 and 0 < nv.ssim < 1
    assert nv.geometry["to_mesh_mean_mm"] == pytest.approx(10.0, abs=1e-3)
    assert rep.splits["novel_pose"].geometry is None
    assert rep.frames[0].lpips is None or rep.lpips_available  # here: lpips not installed -> None

    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert {"format", "version", "created", "settings", "lpips", "splits", "frames"} <= set(doc)
    for split in ("novel_view", "novel_pose"):
        assert {"num_frames", "psnr", "ssim", "lpips", "lpips_x1000", "seconds_per_frame", "geometry"} <= \
            set(doc["splits"][split])
    assert len(doc["frames"]) == 6
    if not rep.lpips_available:
        assert doc["splits"]["novel_view"]["lpips"].startswith("unavailable: ")
        assert doc["lpips"]["available"] is False
    md = (tmp_path / "report.md").read_text()
    assert "## novel_view" in md and "## novel_pose" in md and "PSNR" in md and "Chamfer" in md
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * W, 4 * H)  # 2 rows per split, render | gt | error
    assert not list(tmp_path.glob(".*partial"))


def test_evaluate_perfect_bbox_and_fake_lpips(gen, tmp_path):
    frames = [("novel_view", _frame(gen, 0)), ("novel_view", _frame(gen, 30))]
    fake = LpipsStatus(lambda p, g, m=None: (p - g).abs().mean(), "test stand-in")
    rep = evaluate(_render_perfect, frames, crop="bbox", lpips=fake, background=(1.0, 1.0, 1.0))
    s = rep.splits["novel_view"]
    assert math.isinf(s.psnr) and s.ssim == pytest.approx(1.0, abs=1e-5) and s.lpips == 0.0
    assert rep.lpips_available
    from avatar.eval.report import report_dict

    assert report_dict(rep)["splits"]["novel_view"]["psnr"] == "inf"  # JSON-safe


def test_evaluate_bad_inputs(gen):
    with pytest.raises(ValueError, match="must return rgb"):
        evaluate(lambda f: (torch.zeros(3, 3, 3), torch.zeros(3, 3)), {"novel_view": [_frame(gen, 0)]}, lpips=None)
    with pytest.raises(TypeError, match="pairs"):
        evaluate(_render_perfect, [_frame(gen, 0)], lpips=None)
    with pytest.raises(ValueError, match="crop"):
        evaluate(_render_perfect, {}, crop="mask")
    with pytest.raises(ValueError, match="no frames"):
        evaluate(_render_perfect, {}, lpips=None)
