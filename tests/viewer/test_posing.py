import math

import numpy as np
import pytest
import torch

from avatar.export.bundle import load_bundle
from avatar.export.ply import read_splat_ply
from avatar.skinning.lbs import skin_gaussians
from avatar.types import BodyPose, GaussianSet
from viewer.posing import (AvatarPoser, PosingConfig, pack_viser_buffer, pose_splats, pose_splats_reference,
                           posed_gaussians, prepare_splats)


def _pose(body, gen, scale=0.35):
    return BodyPose(scale * torch.randn(body.num_bones, 3, generator=gen), torch.tensor([0.1, -0.2, 0.05]))


@pytest.fixture(scope="module")
def poser(tiny_bundle, anny_body):
    return AvatarPoser(load_bundle(tiny_bundle), anny_body)


def test_fast_path_matches_skin_gaussians(poser, anny_body, gen):
    T = poser.transforms(_pose(anny_body, gen))
    fast = poser.splats(T)
    g = poser.gaussians
    means, quats = skin_gaussians(g.means, g.quats, g.skin_weights, T)  # the reference, dense weights
    from avatar.geometry.rotations import quat_to_matrix

    M = quat_to_matrix(quats) * g.scales.unsqueeze(-2)
    cov = (M @ M.transpose(-1, -2)).numpy()
    assert fast.centers.dtype == np.float32 and fast.centers.shape == (len(g), 3)
    np.testing.assert_allclose(fast.centers, means.numpy(), atol=2e-5)
    np.testing.assert_allclose(fast.covariances, cov, atol=1e-9, rtol=1e-4)
    # the Gaussians really moved (not an identity pose)
    assert np.abs(fast.centers - g.means.numpy()).max() > 0.05


def test_exact_weights_and_reference_function(poser, anny_body, gen):
    T = poser.transforms(_pose(anny_body, gen))
    exact = prepare_splats(poser.gaussians, PosingConfig(weight_threshold=0.0))
    assert exact.num_bones_per_gaussian == anny_body.num_bones  # softmax leaves every bone a tiny weight
    assert poser.prepared.num_bones_per_gaussian < 40  # thresholding makes the blend sparse
    ref = pose_splats_reference(poser.gaussians, T)
    a = pose_splats(exact, T)
    np.testing.assert_allclose(a.centers, ref.centers, atol=2e-6)
    np.testing.assert_allclose(a.covariances, ref.covariances, atol=1e-10, rtol=1e-4)
    assert np.array_equal(a.rgbs, ref.rgbs) and np.array_equal(a.opacities, ref.opacities)


def test_covariances_psd_and_scales_kept(poser, anny_body, gen):
    T = poser.transforms(_pose(anny_body, gen, scale=0.8))
    cov = poser.splats(T).covariances.astype(np.float64)
    assert np.allclose(cov, cov.transpose(0, 2, 1))
    ev = np.linalg.eigvalsh(cov)  # ascending
    assert ev.min() > 0
    # a rigid rotation keeps the eigenvalues: they are the canonical scales squared
    s2 = np.sort(poser.gaussians.scales.double().numpy() ** 2, axis=1)
    np.testing.assert_allclose(ev, s2, rtol=1e-3)


def test_identity_pose_is_canonical(poser, anny_body):
    T = poser.transforms(BodyPose.zeros(anny_body.num_bones))
    s = poser.splats(T)
    np.testing.assert_allclose(s.centers, poser.gaussians.means.numpy(), atol=1e-5)


def test_offsets_hook_for_a_deformer(poser, anny_body, gen):
    T = poser.transforms(_pose(anny_body, gen))
    off = 0.01 * torch.randn(len(poser.gaussians), 3, generator=gen)
    fast = poser.splats(T, off.numpy())
    ref = pose_splats_reference(poser.gaussians, T, off)
    np.testing.assert_allclose(fast.centers, ref.centers, atol=2e-5)
    assert np.abs(fast.centers - poser.splats(T).centers).max() > 5e-3
    with pytest.raises(ValueError, match="offsets must be"):
        poser.splats(T, np.zeros((3, 3)))


def test_transforms_skeleton_and_mesh_match_the_body_model(poser, anny_body, gen):
    pose = _pose(anny_body, gen)
    out = anny_body(pose, poser.shape)
    T = poser.transforms(pose)
    torch.testing.assert_close(T, out.bone_transforms[0].float(), atol=1e-5, rtol=1e-5)
    seg = poser.skeleton(T)
    child = [j for j, p in enumerate(anny_body.bone_parents) if p >= 0]
    assert seg.shape == (len(child), 2, 3) and seg.dtype == np.float32
    np.testing.assert_allclose(seg[:, 1], out.joints[0, child].numpy(), atol=1e-5)
    np.testing.assert_allclose(seg[:, 0], out.joints[0, [anny_body.bone_parents[j] for j in child]].numpy(), atol=1e-5)
    v, f = poser.mesh(T)
    np.testing.assert_allclose(v, out.vertices[0].numpy(), atol=1e-5)
    assert f.shape == tuple(anny_body.faces.shape) and f.dtype == np.int32


def test_pack_matches_viser(poser, anny_body, gen):
    viser = pytest.importorskip("viser")
    s = poser.splats(poser.transforms(_pose(anny_body, gen)))
    buf = pack_viser_buffer(s)
    assert buf.dtype == np.uint32 and buf.shape == (len(poser.gaussians), 8)
    expected = np.zeros_like(buf)
    H = viser.GaussianSplatHandle
    H._pack_centers(expected, s.centers)
    H._pack_covariances(expected, s.covariances)
    H._pack_rgba(expected, rgbs=s.rgbs, opacities=s.opacities)
    assert np.array_equal(buf, expected)


def test_half_conversion_edge_cases():
    from viewer.posing import SplatArrays

    vals = np.array([0.0, -0.0, 1e-9, 3e-8, 5.96e-8, 6.1e-5, 6.0e-5, 1e-4, -2.5e-6, 0.333, 65504.0, 65520.0, 1e6,
                     -1e6, np.inf, -np.inf, np.nan, 1.0009765625, 1.00048828125, 2.0 ** -24 * 1.5], dtype=np.float32)
    rng = np.random.default_rng(0)
    vals = np.concatenate([vals, (rng.standard_normal(3000) * 10.0 ** rng.uniform(-9, 5, 3000)).astype(np.float32)])
    n = len(vals) // 6
    cov = np.zeros((n, 3, 3), np.float32)
    cov.reshape(n, 9)[:, [0, 1, 2, 4, 5, 8]] = vals[: 6 * n].reshape(n, 6)
    s = SplatArrays(np.zeros((n, 3), np.float32), cov, np.zeros((n, 3), np.uint8), np.zeros((n, 1), np.uint8))
    got = pack_viser_buffer(s)[:, 4:7].copy().view(np.uint16).reshape(n, 6)
    with np.errstate(over="ignore"):
        want = vals[: 6 * n].astype(np.float16).view(np.uint16).reshape(n, 6)
    nan = np.isnan(vals[: 6 * n].reshape(n, 6))
    assert np.array_equal(got[~nan], want[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()


def test_export_ply_round_trip(poser, anny_body, gen, tmp_path):
    T = poser.transforms(_pose(anny_body, gen))
    path = poser.export_ply(tmp_path / "out" / "posed.ply", T)
    back = read_splat_ply(path)
    ref = posed_gaussians(poser.gaussians, T)
    torch.testing.assert_close(back.means, ref.means, atol=1e-6, rtol=0)
    torch.testing.assert_close(back.quats, ref.quats, atol=1e-6, rtol=0)
    assert sorted(p.name for p in path.parent.iterdir()) == ["posed.ply"]


def test_bad_inputs(poser, anny_body):
    g = poser.gaussians
    no_skin = GaussianSet(g.means, g.quats, g.scales, g.opacities, g.colors)
    with pytest.raises(ValueError, match="skin_weights"):
        prepare_splats(no_skin)
    with pytest.raises(TypeError, match="GaussianSet"):
        prepare_splats(g.means)
    with pytest.raises(ValueError, match=r"transforms must be \[J, 4, 4\] with J = 104"):
        pose_splats(poser.prepared, torch.eye(4).expand(3, 4, 4))
    with pytest.raises(ValueError, match="weight_threshold"):
        prepare_splats(g, PosingConfig(weight_threshold=1.5))
    from avatar.export.bundle import Bundle

    b = poser.bundle
    other = Bundle(b.gaussians, "smpl", b.bone_names, b.bone_parents, b.shape, b.shape_names, b.config,
                   b.extra_tensors, b.meta)
    with pytest.raises(ValueError, match="fitted on 'smpl'"):
        AvatarPoser(other, anny_body)
    assert math.isfinite(float(poser.prepared.bone_weights.sum()))
