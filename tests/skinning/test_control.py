import math

import pytest
import torch

from avatar.geometry.rotations import axis_angle_to_matrix, matrix_to_quat
from avatar.skinning.control import (
    ControlPointConfig,
    ControlPointDeformer,
    FrozenBinding,
    PerGaussianDeformer,
    arap_energy,
    blend_deform_frozen,
    blend_deform_points,
    blend_deform_points_csr,
    blend_deform_points_dqs,
    blend_deform_points_mixed,
    blend_matrix,
    blend_node_quats,
    farthest_point_sampling,
    knn_points,
    node_affines,
    node_transforms_from_output,
    pose_features,
    rbf_weights,
    rotation_6d_to_matrix,
)

CFG = ControlPointConfig(num_nodes=32, k=4, graph_k=6, hidden=32, layers=2, pose_latent=8, num_freqs=2)


def _points(gen, n=400):
    return torch.rand(n, 3, generator=gen, dtype=torch.float64) * torch.tensor([0.5, 0.4, 1.7], dtype=torch.float64)


def _deformer(gen, pts, pose_dim=18):
    return ControlPointDeformer.from_surface(pts, pose_dim, CFG, generator=gen)


def _random_rigid(gen, dtype=torch.float64):
    R = axis_angle_to_matrix(torch.randn(3, generator=gen, dtype=dtype))
    return R, torch.randn(3, generator=gen, dtype=dtype) * 0.2


def test_zero_network_output_is_identity_exactly(gen):
    pts = _points(gen)
    d = _deformer(gen, pts).double()
    b = d.bind(pts)
    pose = torch.randn(18, generator=gen, dtype=torch.float64)
    out = d(pts, b, pose)
    assert torch.equal(out, pts)
    R, t = d.node_transforms(pose)
    assert torch.equal(R, torch.eye(3, dtype=R.dtype).expand_as(R)) and torch.equal(t, torch.zeros_like(t))
    assert torch.equal(d.deform_fast(pts, d.blend_matrix(b), pose), pts)
    quats = torch.nn.functional.normalize(torch.randn(pts.shape[0], 4, generator=gen, dtype=torch.float64), dim=-1)
    m, q, _, _ = d.deform_gaussians(pts, quats, b, pose)
    assert torch.equal(m, pts)
    torch.testing.assert_close(q, quats, atol=1e-12, rtol=0)


def test_rbf_weights_normalized_and_match_formula(gen):
    d2 = torch.rand(50, 4, generator=gen, dtype=torch.float64) * 0.01
    idx = torch.randint(0, 10, (50, 4), generator=gen)
    log_r = torch.log(torch.rand(10, generator=gen, dtype=torch.float64) * 0.1 + 0.02)
    w = rbf_weights(d2, log_r, idx)
    torch.testing.assert_close(w.sum(-1), torch.ones(50, dtype=torch.float64), atol=1e-14, rtol=0)
    raw = torch.exp(-d2 / (2 * torch.exp(log_r)[idx] ** 2))
    torch.testing.assert_close(w, raw / raw.sum(-1, keepdim=True), atol=1e-12, rtol=1e-10)
    # far points whose exponentials underflow still get normalized weights
    w_far = rbf_weights(d2 + 1e4, log_r, idx)
    assert torch.isfinite(w_far).all()
    torch.testing.assert_close(w_far.sum(-1), torch.ones(50, dtype=torch.float64), atol=1e-12, rtol=0)


def test_common_rigid_transform_moves_points_rigidly(gen):
    pts = _points(gen)
    d = _deformer(gen, pts)
    nodes = d.nodes.double()
    b = d.bind(pts)
    w = rbf_weights(b.dist2, d.log_radius.double(), b.indices)
    R, T = _random_rigid(gen)
    K = nodes.shape[0]
    Rk = R.expand(K, 3, 3)
    tk = nodes @ R.T + T - nodes  # node-local translation of the global motion x -> R x + T
    out = blend_deform_points(pts, node_affines(nodes, Rk, tk), b.indices, w)
    torch.testing.assert_close(out, pts @ R.T + T, atol=1e-12, rtol=0)
    q = blend_node_quats(Rk, b.indices, w)
    qR = matrix_to_quat(R)
    qR = qR if qR[0] >= 0 else -qR
    torch.testing.assert_close(q, qR.expand_as(q), atol=1e-12, rtol=0)
    # the sparse inference path agrees with the gather path
    W = blend_matrix(b.indices, w, K)
    torch.testing.assert_close(blend_deform_points_csr(pts, node_affines(nodes, Rk, tk), W), out, atol=1e-12, rtol=0)


def test_arap_zero_for_rigid_motion_positive_otherwise(gen):
    pts = _points(gen)
    d = _deformer(gen, pts)
    nodes = d.nodes.double()
    R, T = _random_rigid(gen)
    K = nodes.shape[0]
    tk = nodes @ R.T + T - nodes
    e = arap_energy(nodes, R.expand(K, 3, 3), tk, d.graph)
    assert float(e) < 1e-24
    # a hand-checked non-rigid case: two nodes, one translated by (0, 0, 1)
    p = torch.tensor([[0.0, 0, 0], [1.0, 0, 0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0, 0], [0.0, 0, 1]], dtype=torch.float64)
    g = torch.tensor([[1], [0]])
    # node 0 predicts p1 stays, node 1 moved by 1: error 1; node 1 predicts p0 + (0,0,1), node 0 stayed: error 1
    assert float(arap_energy(p, torch.eye(3, dtype=torch.float64).expand(2, 3, 3), t, g)) == pytest.approx(1.0)


def test_gradients_flow_to_network_radii_and_points(gen):
    pts = _points(gen, 200).float().requires_grad_(True)
    d = _deformer(gen, pts.detach())
    with torch.no_grad():
        d.mlp[-1].weight.normal_(0, 0.05, generator=gen)
    b = d.bind(pts.detach())
    pose = torch.randn(18, generator=gen)
    out = d(pts, b, pose)
    R, t = d.node_transforms(pose)
    (out.square().sum() + d.arap(R, t)).backward()
    for name, p in d.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert d.log_radius.grad.abs().sum() > 0
    assert d.mlp[0].weight.grad.abs().sum() > 0 and d.pose_encoder.weight.grad.abs().sum() > 0
    assert pts.grad is not None and pts.grad.abs().sum() > 0


def test_blend_gradcheck_float64(gen):
    pts = _points(gen, 20).requires_grad_(True)
    aff = (torch.randn(6, 12, generator=gen, dtype=torch.float64) * 0.1).requires_grad_(True)
    idx = torch.randint(0, 6, (20, 3), generator=gen)
    d2 = torch.rand(20, 3, generator=gen, dtype=torch.float64) * 0.01
    log_r = torch.full((6,), math.log(0.05), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, lr: blend_deform_points(x, a, idx, rbf_weights(d2, lr, idx)),
                                    (pts, aff, log_r))
    assert torch.autograd.gradcheck(lambda o: node_transforms_from_output(o)[0],
                                    ((torch.randn(4, 9, generator=gen, dtype=torch.float64) * 0.3).requires_grad_(True),))


def test_knn_matches_brute_force(gen):
    q = torch.rand(300, 3, generator=gen, dtype=torch.float64)
    p = torch.rand(57, 3, generator=gen, dtype=torch.float64)
    d2, idx = knn_points(q, p, 5, chunk=64)
    full = torch.cdist(q, p) ** 2
    ref_d, ref_i = torch.sort(full, dim=1)
    assert torch.equal(idx, ref_i[:, :5])
    torch.testing.assert_close(d2, ref_d[:, :5], atol=1e-12, rtol=0)
    d2s, idxs = knn_points(p, p, 3, exclude_self=True)
    full_p = torch.cdist(p, p) ** 2 + torch.diag(torch.full((57,), float("inf"), dtype=torch.float64))
    assert torch.equal(idxs, torch.sort(full_p, dim=1).indices[:, :3])


def test_farthest_point_sampling_against_greedy_reference(gen):
    p = torch.rand(80, 3, generator=gen, dtype=torch.float64)
    idx = farthest_point_sampling(p, 10)
    chosen = [0]
    for _ in range(9):
        dmin = torch.cdist(p, p[chosen]).min(1).values
        chosen.append(int(dmin.argmax()))
    assert idx.tolist() == chosen
    assert len(set(idx.tolist())) == 10


def test_rotation_6d_and_pose_features(gen):
    R = axis_angle_to_matrix(torch.randn(7, 3, generator=gen, dtype=torch.float64))
    d6 = torch.cat([R[..., :, 0], R[..., :, 1]], -1)
    torch.testing.assert_close(rotation_6d_to_matrix(d6), R, atol=1e-12, rtol=0)
    assert torch.equal(pose_features(torch.zeros(5, 3)), torch.zeros(45))
    f = pose_features(torch.randn(5, 3, generator=gen), joints=(1, 3))
    assert f.shape == (18,)


def test_per_gaussian_baseline_identity_and_grad(gen):
    pts = _points(gen, 100).float()
    m = PerGaussianDeformer(18, 1.7, generator=gen)
    pose = torch.randn(18, generator=gen)
    assert torch.equal(m(pts, pose), pts)
    with torch.no_grad():
        m.mlp[-1].weight.normal_(0, 0.05, generator=gen)
    m(pts, pose).square().sum().backward()
    assert m.mlp[0].weight.grad.abs().sum() > 0


def test_bad_input_errors(gen):
    pts = _points(gen, 100)
    with pytest.raises(ValueError, match="num_nodes"):
        ControlPointConfig(num_nodes=0).validate()
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        farthest_point_sampling(pts[:, :2], 3)
    d = _deformer(gen, pts.float())
    with pytest.raises(ValueError, match="pose must be"):
        d.node_transforms(torch.zeros(5))


def test_fits_a_pose_dependent_offset(gen):
    """40 Adam steps on a synthetic pose-dependent bulge reduce the error well below the no-deformation error."""
    pts = _points(gen, 300).float()
    cfg = ControlPointConfig(num_nodes=48, k=4, graph_k=6, hidden=32, layers=2, pose_latent=4, num_freqs=2)
    d = ControlPointDeformer.from_surface(pts, 2, cfg, generator=gen)
    b = d.bind(pts)
    poses = torch.rand(4, 2, generator=gen) * 2 - 1

    def target(p):
        return pts + 0.03 * p[0] * torch.stack([torch.sin(4 * pts[:, 2]), pts[:, 2] * 0, pts[:, 0] * 0], -1) \
            + 0.02 * p[1] * torch.tensor([0.0, 0.0, 1.0])

    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    base = sum(float((pts - target(p)).square().mean()) for p in poses)
    for _ in range(40):
        opt.zero_grad()
        loss = sum((d(pts, b, p) - target(p)).square().mean() for p in poses)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.2 * base


# ---- LBS / DQS / mixed blending and the fused inference kernel -------------------------------------------------

BACKENDS_TESTED = ["torch", pytest.param("numba", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("numba") is None, reason="numba not installed"))]


def _global_rigid(gen, nodes):
    R, T = _random_rigid(gen)
    K = nodes.shape[0]
    return R, T, R.expand(K, 3, 3).contiguous(), nodes @ R.T + T - nodes


@pytest.mark.parametrize("blend", ["lbs", "dqs", "mix"])
@pytest.mark.parametrize("backend", BACKENDS_TESTED)
def test_pure_rigid_motion_reproduced_exactly_by_every_blend(gen, blend, backend):
    pts = _points(gen)
    d = _deformer(gen, pts)
    nodes = d.nodes.double()
    b = d.bind(pts)
    w = rbf_weights(b.dist2, d.log_radius.double(), b.indices)
    R, T, Rk, tk = _global_rigid(gen, nodes)
    mix = torch.rand(nodes.shape[0], generator=gen, dtype=torch.float64)
    ref = pts @ R.T + T
    if blend == "lbs":
        out = blend_deform_points(pts, node_affines(nodes, Rk, tk), b.indices, w)
    elif blend == "dqs":
        out = blend_deform_points_dqs(pts, nodes, Rk, tk, b.indices, w)
    else:
        out = blend_deform_points_mixed(pts, nodes, Rk, tk, b.indices, w, mix)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    fz = FrozenBinding(b.indices, w, nodes.shape[0])
    fast = blend_deform_frozen(pts, fz, nodes, Rk, tk, blend, mix if blend == "mix" else None, backend)
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=0)


def _twist(angle: float):
    """Two nodes on the z axis at z=0 and z=1, the upper one turned by ``angle`` about z; a ring of points of
    radius 0.1 at z=0.5 weighted 1/2, 1/2 between them."""
    nodes = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    R = torch.stack([torch.eye(3, dtype=torch.float64),
                     axis_angle_to_matrix(torch.tensor([0.0, 0.0, angle], dtype=torch.float64))])
    t = torch.zeros(2, 3, dtype=torch.float64)
    phi = torch.linspace(0, 2 * math.pi, 25, dtype=torch.float64)[:-1]
    ring = torch.stack([0.1 * torch.cos(phi), 0.1 * torch.sin(phi), torch.full_like(phi, 0.5)], -1)
    idx = torch.tensor([[0, 1]]).expand(ring.shape[0], 2).contiguous()
    w = torch.full((ring.shape[0], 2), 0.5, dtype=torch.float64)
    return nodes, R, t, ring, idx, w


@pytest.mark.parametrize("backend", BACKENDS_TESTED)
def test_dqs_keeps_volume_under_a_twist_where_lbs_collapses(backend):
    angle = math.radians(150)
    nodes, R, t, ring, idx, w = _twist(angle)
    fz = FrozenBinding(idx, w, 2)
    lbs = blend_deform_frozen(ring, fz, nodes, R, t, "lbs", backend=backend)
    dqs = blend_deform_frozen(ring, fz, nodes, R, t, "dqs", backend=backend)
    mix = blend_deform_frozen(ring, fz, nodes, R, t, "mix", torch.full((2,), 0.5, dtype=torch.float64), backend)
    r = lambda x: x[:, :2].norm(dim=-1)  # noqa: E731
    # LBS: the ring shrinks to |cos(angle / 2)| of its radius (candy wrapper); DQS: a rigid turn by angle / 2
    torch.testing.assert_close(r(lbs), torch.full_like(r(lbs), 0.1 * abs(math.cos(angle / 2))), atol=1e-12, rtol=0)
    torch.testing.assert_close(r(dqs), torch.full_like(r(dqs), 0.1), atol=1e-12, rtol=0)
    half = axis_angle_to_matrix(torch.tensor([0.0, 0.0, angle / 2], dtype=torch.float64))
    torch.testing.assert_close(dqs, ring @ half.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(mix, 0.5 * (lbs + dqs), atol=1e-12, rtol=0)
    assert float(r(lbs).max()) < 0.03 < 0.1 - 1e-9 < float(r(dqs).min())


@pytest.mark.parametrize("blend", ["lbs", "dqs", "mix"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numba_kernel_matches_torch_reference(gen, blend, dtype):
    pytest.importorskip("numba")
    pts = _points(gen, 600).to(dtype)
    cfg = ControlPointConfig(**{**CFG.__dict__, "blend": blend})
    d = ControlPointDeformer.from_surface(pts, 18, cfg, generator=gen).to(dtype)
    with torch.no_grad():
        d.mlp[-1].weight.normal_(0, 0.3, generator=gen)
        d.mlp[-1].bias.normal_(0, 0.05, generator=gen)
    b = d.bind(pts)
    pose = torch.randn(18, generator=gen, dtype=dtype)
    with torch.no_grad():
        ref = d(pts, b, pose)
        fz = d.freeze(b)
        fast = d.deform_fast(pts, fz, pose, backend="numba")
        slow = d.deform_fast(pts, fz, pose, backend="torch")
    assert float((ref - pts).abs().max()) > 1e-2  # a real deformation
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(fast, ref, atol=tol, rtol=0)
    torch.testing.assert_close(slow, ref, atol=tol, rtol=0)
    assert fast.dtype == dtype


@pytest.mark.parametrize("blend", ["lbs", "dqs", "mix"])
def test_zero_output_identity_for_every_blend_and_backend(gen, blend):
    pts = _points(gen)
    cfg = ControlPointConfig(**{**CFG.__dict__, "blend": blend})
    d = ControlPointDeformer.from_surface(pts, 18, cfg, generator=gen).double()
    b = d.bind(pts)
    pose = torch.randn(18, generator=gen, dtype=torch.float64)
    assert torch.equal(d(pts, b, pose), pts)
    backends = ["torch"] + (["numba"] if __import__("importlib").util.find_spec("numba") else [])
    for backend in backends:
        assert torch.equal(d.deform_fast(pts, d.freeze(b), pose, backend=backend), pts), backend


def test_mixed_blend_gradients_reach_mix_and_transforms(gen):
    pts = _points(gen, 12).requires_grad_(True)
    nodes = _points(gen, 5)
    Rk = axis_angle_to_matrix(torch.randn(5, 3, generator=gen, dtype=torch.float64) * 0.5)
    tk = (torch.randn(5, 3, generator=gen, dtype=torch.float64) * 0.1).requires_grad_(True)
    idx = torch.randint(0, 5, (12, 3), generator=gen)
    w = torch.softmax(torch.randn(12, 3, generator=gen, dtype=torch.float64), -1)
    mix = torch.rand(5, generator=gen, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, t, m: blend_deform_points_mixed(x, nodes, Rk, t, idx, w, m),
                                    (pts, tk, mix))
    d = ControlPointDeformer.from_surface(_points(gen).float(), 18, ControlPointConfig(**{**CFG.__dict__, "blend": "mix"}),
                                          generator=gen)
    with torch.no_grad():
        d.mlp[-1].weight.normal_(0, 0.1, generator=gen)
    p = _points(gen).float()
    d(p, d.bind(p), torch.randn(18, generator=gen)).square().sum().backward()
    assert d.mix_logit.grad is not None and d.mix_logit.grad.abs().sum() > 0


def test_blend_config_and_fast_path_errors(gen):
    with pytest.raises(ValueError, match="blend must be one of"):
        ControlPointConfig(blend="slerp").validate()
    with pytest.raises(ValueError, match="mix_init"):
        ControlPointConfig(blend="mix", mix_init=1.0).validate()
    pts = _points(gen)
    d = ControlPointDeformer.from_surface(pts, 18, ControlPointConfig(**{**CFG.__dict__, "blend": "dqs"}),
                                          generator=gen).double()
    b = d.bind(pts)
    pose = torch.zeros(18, dtype=torch.float64)
    with pytest.raises(ValueError, match="CSR matrix only serves"):
        d.deform_fast(pts, d.blend_matrix(b), pose)
    with pytest.raises(ValueError, match="backend must be one of"):
        d.deform_fast(pts, d.freeze(b), pose, backend="cuda")
    with pytest.raises(ValueError, match="N = the binding"):
        d.deform_fast(pts[:10], d.freeze(b), pose)
