import math

import pytest
import torch

from avatar.eval.metrics import (
    geometry_error,
    lpips_metric,
    mask_bbox,
    nearest_point_distance,
    point_to_mesh_distance,
    psnr,
    sample_mesh_surface,
    ssim,
)


def _pair(gen, shape=(2, 48, 40, 3), noise=0.05):
    a = torch.rand(*shape, generator=gen)
    b = (a + noise * torch.randn(*shape, generator=gen)).clamp(0, 1)
    return a, b


def test_psnr_analytic(gen):
    gt = torch.rand(16, 16, 3, generator=gen) * 0.5
    pred = gt + 0.1  # MSE = 0.01 -> 20 dB
    assert float(psnr(pred, gt)) == pytest.approx(20.0, abs=1e-4)
    assert math.isinf(float(psnr(gt, gt)))
    assert psnr(torch.stack([pred, gt]), torch.stack([gt, gt])).shape == (2,)


def test_psnr_ssim_match_scikit_image(gen):
    skm = pytest.importorskip("skimage.metrics")
    a, b = _pair(gen)
    p, s = psnr(a, b), ssim(a, b, padding="valid")
    for i in range(2):
        ref_p = skm.peak_signal_noise_ratio(a[i].numpy(), b[i].numpy(), data_range=1.0)
        ref_s = skm.structural_similarity(a[i].numpy(), b[i].numpy(), data_range=1.0, channel_axis=-1,
                                          gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert float(p[i]) == pytest.approx(ref_p, abs=1e-4)
        assert float(s[i]) == pytest.approx(float(ref_s), abs=1e-4)


def test_ssim_identity_and_same_padding(gen):
    a, b = _pair(gen)
    assert torch.allclose(ssim(a, a), torch.ones(2), atol=1e-5)
    same, valid = ssim(a, b), ssim(a, b, padding="valid")
    assert bool((same < 1).all()) and bool((same > 0.5).all())
    assert not torch.allclose(same, valid)  # zero-padded borders differ from skimage's cropped windows


def test_bbox_crop(gen):
    gt = torch.zeros(32, 32, 3)
    pred = gt.clone()
    pred[0:4, 0:4] = 1.0  # error outside the body box only
    mask = torch.zeros(32, 32)
    mask[10:25, 8:30] = 1
    assert mask_bbox(mask) == (10, 25, 8, 30)
    assert mask_bbox(mask, margin=20) == (0, 32, 0, 32)
    assert math.isinf(float(psnr(pred, gt, crop_mask=mask)))
    assert float(psnr(pred, gt)) < 20
    pred[12, 12] = 0.5  # one pixel inside the box: MSE = 0.25 / (15 * 22)
    assert float(psnr(pred, gt, crop_mask=mask)) == pytest.approx(-10 * math.log10(0.25 / (15 * 22)), abs=1e-3)
    assert float(ssim(pred, gt, crop_mask=mask)) < 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(8, 8, 3), torch.zeros(8, 9, 3))
    with pytest.raises(ValueError, match="3 channels"):
        psnr(torch.zeros(8, 8, 4), torch.zeros(8, 8, 4))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(8, 8, 3), torch.zeros(8, 8, 3))
    with pytest.raises(TypeError, match="float"):
        psnr(torch.zeros(8, 8, 3, dtype=torch.uint8), torch.zeros(8, 8, 3, dtype=torch.uint8))


def test_lpips_unavailable_with_reason(tmp_path):
    status = lpips_metric(hub_dir=tmp_path)  # an empty hub cache: never a number without local weights
    assert status.fn is None and not status.available
    assert isinstance(status.reason, str) and status.reason
    with pytest.raises(ValueError, match="net must be"):
        lpips_metric(net="resnet")


# --------------------------------------------------------------------------------------------------- geometry
def _box_mesh():
    trimesh = pytest.importorskip("trimesh")
    m = trimesh.creation.box(extents=(0.4, 0.6, 1.6))
    return torch.tensor(m.vertices, dtype=torch.float64), torch.tensor(m.faces, dtype=torch.long), m


def test_point_to_mesh_distance_matches_brute_force(gen):
    trimesh = pytest.importorskip("trimesh")
    m = trimesh.creation.icosphere(subdivisions=2)
    v, f = torch.tensor(m.vertices), torch.tensor(m.faces)
    q = torch.randn(200, 3, generator=gen, dtype=torch.float64) * 1.5
    # brute force: closest point over every face, evaluated pairwise without pruning
    from avatar.eval.metrics import _pair_distance2

    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    n = torch.linalg.cross(b - a, c - a)
    n = n / n.norm(dim=-1, keepdim=True)
    P, F = q.shape[0], f.shape[0]
    ref = _pair_distance2(q[:, None].expand(P, F, 3).reshape(-1, 3), a.repeat(P, 1), b.repeat(P, 1),
                          c.repeat(P, 1), n.repeat(P, 1), torch.zeros(P * F, dtype=torch.bool))
    ref = ref.view(P, F).amin(1).sqrt()
    assert torch.allclose(point_to_mesh_distance(q, v, f), ref, atol=1e-12)
    # outside points: the inscribed polyhedron lies between radius 0.9 and 1
    far = q[q.norm(dim=-1) > 1.2]
    d, r = point_to_mesh_distance(far, v, f), far.norm(dim=-1)
    assert len(far) > 50 and bool((d >= r - 1 - 1e-9).all()) and bool((d <= r - 0.9).all())


def test_box_distances_analytic():
    v, f, _ = _box_mesh()
    pts = torch.tensor([[0.0, 0.0, 0.8 + 0.05],  # above the top face centre: 5 cm
                        [0.2 + 0.03, 0.3 + 0.04, 0.0],  # outside a vertical edge: 5 cm
                        [0.0, 0.0, 0.0]], dtype=torch.float64)  # centre: 0.2 m to the nearest side face
    assert torch.allclose(point_to_mesh_distance(pts, v, f), torch.tensor([0.05, 0.05, 0.2], dtype=torch.float64))


def test_geometry_error_zero_on_surface_and_grows_with_offset(gen):
    trimesh = pytest.importorskip("trimesh")
    m = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    v, f = torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces)
    centres = sample_mesh_surface(v, f, 4000, gen)
    e0 = geometry_error(centres, v, f, num_samples=4000, generator=gen)
    assert e0.to_mesh_mean_mm < 1e-3 and e0.to_mesh_median_mm < 1e-3
    assert e0.from_mesh_mean_mm < 15  # limited only by the sampling density of the centres
    # push every centre 10 mm outward along the face normal: the distance grows by exactly 10 mm
    normals = torch.tensor(m.face_normals, dtype=torch.float32)
    _, _, fid = trimesh.proximity.closest_point_naive(m, centres.double().numpy())
    moved = centres + 0.01 * normals[torch.as_tensor(fid)]
    e1 = geometry_error(moved, v, f, num_samples=4000, generator=gen)
    assert e1.to_mesh_mean_mm == pytest.approx(10.0, abs=1e-3)
    assert e1.to_mesh_median_mm == pytest.approx(10.0, abs=1e-3)
    # every surface point is >= 10 mm from every moved centre, and at most 10 mm farther than before
    assert 10.0 - 1e-3 <= e1.from_mesh_median_mm <= e1.from_mesh_mean_mm <= e0.from_mesh_mean_mm + 10.0 + 1e-3
    assert e1.chamfer_mm == pytest.approx((e1.to_mesh_mean_mm + e1.from_mesh_mean_mm) / 2)


def test_sampling_is_seeded_and_on_surface():
    v, f, _ = _box_mesh()
    s1 = sample_mesh_surface(v, f, 500, torch.Generator().manual_seed(3))
    s2 = sample_mesh_surface(v, f, 500, torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2)
    assert float(point_to_mesh_distance(s1, v, f).max()) < 1e-12
    assert float(nearest_point_distance(s1[:10], s1).max()) == 0.0


def test_lpips_available_path_with_local_stand_in(tmp_path, monkeypatch):
    """The offline check and the callable's plumbing, with stand-in packages (the real ones are not installed)."""
    import sys

    pkgs = tmp_path / "pkgs"
    (pkgs / "lpips" / "weights" / "v0.1").mkdir(parents=True)
    (pkgs / "lpips" / "weights" / "v0.1" / "alex.pth").write_bytes(b"")
    (pkgs / "lpips" / "__init__.py").write_text(
        "import torch\n"
        "class LPIPS(torch.nn.Module):\n"
        "    def __init__(self, net='alex', verbose=True):\n"
        "        super().__init__(); self.w = torch.nn.Parameter(torch.ones(()))\n"
        "    def forward(self, x, y):\n"
        "        assert x.shape[1] == 3 and float(x.min()) >= -1 and float(x.max()) <= 1\n"
        "        return (self.w * (x - y).abs().mean(dim=(1, 2, 3), keepdim=True))\n")
    (pkgs / "torchvision").mkdir()
    (pkgs / "torchvision" / "__init__.py").write_text("")
    hub = tmp_path / "hub"
    monkeypatch.syspath_prepend(str(pkgs))
    for name in ("lpips", "torchvision"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        status = lpips_metric(hub_dir=hub)
        assert status.fn is None and "backbone" in status.reason and "alex" in status.reason
        (hub / "checkpoints").mkdir(parents=True)
        (hub / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes(b"")
        before = torch.hub.get_dir()
        status = lpips_metric(hub_dir=hub)
        assert status.available and torch.hub.get_dir() == before
        a, b = torch.zeros(2, 16, 16, 3), torch.full((2, 16, 16, 3), 0.25)
        assert torch.allclose(status.fn(a, b), torch.full((2,), 0.5))  # |(2a-1) - (2b-1)| = 0.5
    finally:  # never leave the stand-ins importable for other tests
        for name in ("lpips", "torchvision"):
            sys.modules.pop(name, None)
