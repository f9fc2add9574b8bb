import math

import pytest
import torch

from avatar.geometry import axis_angle_to_matrix, matrix_to_quat, quat_multiply, quat_to_matrix, rigid
from avatar.skinning import (
    blend_transforms,
    dqs_points,
    inverse_lbs_points,
    lbs_points,
    polar_rotation,
    skin_covariances,
    skin_gaussians,
)


def random_rigid(J, gen, dtype=torch.float32, batch=()):
    R = axis_angle_to_matrix(torch.randn(*batch, J, 3, generator=gen, dtype=dtype))
    t = torch.randn(*batch, J, 3, generator=gen, dtype=dtype)
    return rigid(R, t)


def random_weights(N, J, gen, dtype=torch.float32, K=None):
    logits = 3 * torch.randn(N, J, generator=gen, dtype=dtype)
    w = torch.softmax(logits, -1)
    if K is None:
        return w, None
    top = w.topk(K, dim=-1)
    return top.values / top.values.sum(-1, keepdim=True), top.indices


def test_identity_transforms_leave_points(gen):
    pts = torch.randn(50, 3, generator=gen)
    w, _ = random_weights(50, 7, gen)
    eye = torch.eye(4).expand(7, 4, 4)
    torch.testing.assert_close(lbs_points(pts, w, eye), pts)


def test_single_bone_is_rigid(gen):
    T = random_rigid(5, gen)
    pts = torch.randn(20, 3, generator=gen)
    w = torch.zeros(20, 5)
    w[:, 2] = 1
    expected = pts @ T[2, :3, :3].T + T[2, :3, 3]
    torch.testing.assert_close(lbs_points(pts, w, T), expected)
    torch.testing.assert_close(dqs_points(pts, w, T), expected, atol=1e-5, rtol=0)


def test_dense_and_sparse_layouts_agree(gen):
    T = random_rigid(12, gen, batch=(3,))
    w_sparse, idx = random_weights(100, 12, gen, K=4)
    dense = torch.zeros(100, 12).scatter_(1, idx, w_sparse)
    pts = torch.randn(3, 100, 3, generator=gen)
    torch.testing.assert_close(lbs_points(pts, dense, T), lbs_points(pts, w_sparse, T, idx))
    torch.testing.assert_close(dqs_points(pts, dense, T), dqs_points(pts, w_sparse, T, idx), atol=1e-5, rtol=0)
    torch.testing.assert_close(blend_transforms(dense, T), blend_transforms(w_sparse, T, idx))


def test_blend_is_weighted_sum(gen):
    T = random_rigid(4, gen)
    w, _ = random_weights(6, 4, gen)
    A = blend_transforms(w, T)
    expected = torch.einsum("nj,jab->nab", w, T[:, :3, :])
    torch.testing.assert_close(A, expected)


def test_inverse_lbs_inverts_forward(gen):
    T = random_rigid(8, gen, dtype=torch.float64)
    # modest rotations keep blended transforms well conditioned, as real poses do
    T[:, :3, :3] = axis_angle_to_matrix(0.5 * torch.randn(8, 3, generator=gen, dtype=torch.float64))
    w, idx = random_weights(500, 8, gen, dtype=torch.float64, K=3)
    canon = torch.randn(500, 3, generator=gen, dtype=torch.float64)
    posed = lbs_points(canon, w, T, idx)
    back = inverse_lbs_points(posed, w, T, idx)
    torch.testing.assert_close(back, canon, atol=1e-9, rtol=0)
    back32 = inverse_lbs_points(posed.float(), w.float(), T.float(), idx)
    assert (back32 - canon.float()).abs().max() < 1e-4


def test_polar_rotation(gen):
    R = axis_angle_to_matrix(torch.randn(30, 3, generator=gen, dtype=torch.float64))
    torch.testing.assert_close(polar_rotation(R), R)
    S = torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(30, 3, 3, generator=gen, dtype=torch.float64)
    S = 0.5 * (S + S.transpose(-1, -2))  # symmetric positive definite
    Q = polar_rotation(R @ S)
    torch.testing.assert_close(Q, R, atol=1e-10, rtol=0)


def test_skin_gaussians(gen):
    T = random_rigid(6, gen)
    means = torch.randn(40, 3, generator=gen)
    quats = torch.randn(40, 4, generator=gen)
    w = torch.zeros(40, 6)
    w[:, 1] = 1
    pm, pq = skin_gaussians(means, quats, w, T)
    torch.testing.assert_close(pm, means @ T[1, :3, :3].T + T[1, :3, 3])
    expected = quat_to_matrix(matrix_to_quat(T[1, :3, :3]).expand(40, 4)) @ quat_to_matrix(quats)
    torch.testing.assert_close(quat_to_matrix(pq), expected, atol=1e-5, rtol=0)
    assert (pq[:, 0] >= 0).all()
    torch.testing.assert_close(pq.norm(dim=-1), torch.ones(40))
    # blended weights: rotation is the polar factor, covariances the full linear map
    w2, _ = random_weights(40, 6, gen)
    _, pq2 = skin_gaussians(means, quats, w2, T)
    A = blend_transforms(w2, T)[..., :3]
    torch.testing.assert_close(quat_to_matrix(pq2), polar_rotation(A) @ quat_to_matrix(quats), atol=1e-4, rtol=0)


def test_skin_covariances_match_gaussians_for_rigid_weights(gen):
    T = random_rigid(3, gen)
    means = torch.randn(10, 3, generator=gen)
    quats = torch.randn(10, 4, generator=gen)
    scales = torch.rand(10, 3, generator=gen) + 0.1
    R = quat_to_matrix(quats)
    cov = R @ torch.diag_embed(scales**2) @ R.transpose(-1, -2)
    w = torch.zeros(10, 3)
    w[:, 0] = 1
    m1, q1 = skin_gaussians(means, quats, w, T)
    m2, c2 = skin_covariances(means, cov, w, T)
    R1 = quat_to_matrix(q1)
    torch.testing.assert_close(m1, m2)
    torch.testing.assert_close(R1 @ torch.diag_embed(scales**2) @ R1.transpose(-1, -2), c2, atol=1e-5, rtol=0)


def test_dqs_avoids_candy_wrapper():
    """Two bones, one twisted 180 degrees about x, 50/50 weights: LBS collapses points onto the axis, DQS keeps
    their distance to it."""
    T = torch.eye(4).repeat(2, 1, 1)
    T[1, :3, :3] = axis_angle_to_matrix(torch.tensor([math.pi * 0.999, 0.0, 0.0]))
    pts = torch.tensor([[0.0, 0.1, 0.0], [0.0, 0.0, 0.1]])
    w = torch.full((2, 2), 0.5)
    lbs_r = lbs_points(pts, w, T)[:, 1:].norm(dim=-1)
    dqs_r = dqs_points(pts, w, T)[:, 1:].norm(dim=-1)
    assert (lbs_r < 0.01).all()
    torch.testing.assert_close(dqs_r, torch.full((2,), 0.1), atol=1e-5, rtol=0)


def test_dqs_translation_blend(gen):
    T = torch.eye(4).repeat(2, 1, 1)
    T[1, :3, 3] = torch.tensor([1.0, 2.0, 3.0])
    pts = torch.randn(5, 3, generator=gen)
    w = torch.tensor([[0.25, 0.75]]).expand(5, 2)
    torch.testing.assert_close(dqs_points(pts, w, T), pts + 0.75 * T[1, :3, 3])


@pytest.mark.parametrize("sparse", [False, True])
def test_gradcheck_float64(gen, sparse):
    d = torch.float64
    J, N = 4, 6
    T = random_rigid(J, gen, dtype=d)
    T[:, :3, :3] = axis_angle_to_matrix(0.4 * torch.randn(J, 3, generator=gen, dtype=d))
    w, idx = random_weights(N, J, gen, dtype=d, K=3 if sparse else None)
    pts = torch.randn(N, 3, generator=gen, dtype=d)
    quats = torch.randn(N, 4, generator=gen, dtype=d)
    cov = torch.eye(3, dtype=d).repeat(N, 1, 1) + 0.1 * torch.rand(N, 3, 3, generator=gen, dtype=d)
    args = [t.clone().requires_grad_() for t in (pts, w, T)]
    assert torch.autograd.gradcheck(lambda p, w_, t: lbs_points(p, w_, t, idx), args)
    assert torch.autograd.gradcheck(lambda p, w_, t: inverse_lbs_points(p, w_, t, idx), args)
    assert torch.autograd.gradcheck(lambda p, w_, t: dqs_points(p, w_, t, idx), args)
    q = quats.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda p, q_, w_, t: skin_gaussians(p, q_, w_, t, idx), [args[0], q, args[1], args[2]])
    c = cov.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda p, c_, w_, t: skin_covariances(p, c_, w_, t, idx), [args[0], c, args[1], args[2]])


def test_gradcheck_polar(gen):
    M = (axis_angle_to_matrix(torch.randn(4, 3, generator=gen, dtype=torch.float64))
         + 0.05 * torch.randn(4, 3, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(polar_rotation, [M])


def test_bad_shapes_are_clear(gen):
    T = random_rigid(5, gen)
    w, _ = random_weights(10, 5, gen)
    pts = torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"points must be \[\.\.\., N, 3\]"):
        lbs_points(torch.randn(10, 2), w, T)
    with pytest.raises(ValueError, match="5 bones|bones but transforms"):
        lbs_points(pts, w[:, :4], T)
    with pytest.raises(ValueError, match="transforms must be"):
        lbs_points(pts, w, T[:, :3])
    with pytest.raises(ValueError, match="10 points|points but weights"):
        lbs_points(torch.randn(9, 3), w, T)
    with pytest.raises(ValueError, match="indices must lie"):
        lbs_points(pts, w[:, :2], T, torch.full((10, 2), 7))
    with pytest.raises(ValueError, match="quats"):
        skin_gaussians(pts, torch.randn(10, 3), w, T)
    with pytest.raises(ValueError, match="covariances"):
        skin_covariances(pts, torch.randn(10, 3), w, T)
