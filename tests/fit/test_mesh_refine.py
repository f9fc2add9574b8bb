"""Mesh refinement: pure losses (values, gradcheck), mesh operators, and small refinements on a two-bone toy body
(a textured tube bent at an elbow) that recover the shape and the joint angles from rendered views."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avatar.body.base import BodyModel
from avatar.fit.mesh_refine import (
    MeshRefineConfig,
    MeshStage,
    RefineView,
    face_adjacency,
    laplacian_loss,
    mesh_edges,
    normal_consistency_loss,
    refine_mesh,
    subdivide_mesh,
)
from avatar.geometry.projection import intrinsics_from_fov, look_at
from avatar.geometry.rotations import axis_angle_to_matrix
from avatar.render.mesh import render_mesh
from avatar.skinning.lbs import lbs_points
from avatar.types import BodyPose, Cameras, RestBody

# ----------------------------------------------------------------------------------------------------------------
# pure functions


def _grid(n: int = 5, dtype=torch.float64):
    ii, jj = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    v = torch.stack([ii.reshape(-1), jj.reshape(-1), torch.zeros(n * n, dtype=torch.int64)], -1).to(dtype) * 0.1
    f = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b, c, d = i * n + j, i * n + j + 1, (i + 1) * n + j, (i + 1) * n + j + 1
            f += [[a, c, b], [b, c, d]]
    return v, torch.tensor(f)


def test_mesh_edges_and_adjacency_of_a_tetrahedron():
    f = torch.tensor([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]])
    assert mesh_edges(f).shape == (6, 2)
    adj = face_adjacency(f)
    assert adj.shape == (6, 2)  # every pair of a tetrahedron's faces shares one edge
    assert {tuple(sorted(p)) for p in adj.tolist()} == {(a, b) for a in range(4) for b in range(a + 1, 4)}


def test_laplacian_loss_values():
    v, f = _grid()
    assert float(laplacian_loss(v, f)) > 0  # boundary vertices of a flat grid still have a Laplacian
    lifted = v.clone()
    lifted[12, 2] = 0.1  # bump the centre vertex (index 12 of the 5x5 grid) by 0.1
    # displacement Laplacian: centre 0.1 - 0 = 0.1 (all its 6 neighbours are flat), each neighbour -0.1/deg
    e = mesh_edges(f)
    deg = torch.bincount(e.reshape(-1), minlength=25).double()
    nbrs = set(e[(e == 12).any(1)].reshape(-1).tolist()) - {12}
    expected = (0.1 ** 2 + sum((0.1 / deg[j]) ** 2 for j in nbrs)) / 25
    torch.testing.assert_close(laplacian_loss(lifted, f, reference=v), torch.tensor(float(expected), dtype=torch.float64))
    # a rigid translation of the whole mesh costs nothing against the reference
    assert float(laplacian_loss(v + torch.tensor([0.3, -0.1, 2.0], dtype=torch.float64), f, reference=v)) < 1e-28


def test_normal_consistency_loss_values():
    v, f = _grid()
    assert float(normal_consistency_loss(v, f)) < 1e-12  # flat
    # two triangles folded by 90 degrees along their shared edge: 1 - cos 90 = 1
    v2 = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    f2 = torch.tensor([[0, 1, 2], [0, 3, 1]])
    torch.testing.assert_close(normal_consistency_loss(v2, f2), torch.tensor(1.0, dtype=torch.float64))
    v3 = v2.clone()
    v3[3] = torch.tensor([0.0, -1, 1]) / math.sqrt(2)  # 45 degrees off the plane
    torch.testing.assert_close(normal_consistency_loss(v3, f2), torch.tensor(1 - math.cos(math.pi / 4), dtype=torch.float64))


def test_losses_gradcheck():
    v, f = _grid(4)
    g = torch.Generator().manual_seed(0)
    x = (v + 0.02 * torch.randn(v.shape, generator=g, dtype=torch.float64)).requires_grad_()
    ref = v.clone()
    adj, e = face_adjacency(f), mesh_edges(f)
    assert torch.autograd.gradcheck(lambda y: laplacian_loss(y, f, ref, e), (x,))
    assert torch.autograd.gradcheck(lambda y: normal_consistency_loss(y, f, adj), (x,))


def test_subdivide_keeps_manifold_and_interpolates():
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=1)
    v = torch.from_numpy(np.asarray(m.vertices)).float()
    f = torch.from_numpy(np.asarray(m.faces, np.int64))
    w = torch.softmax(torch.randn(len(v), 4, generator=torch.Generator().manual_seed(0)), -1)
    v2, f2, a = subdivide_mesh(v, f, {"w": w})
    assert f2.shape[0] == 4 * f.shape[0] and v2.shape[0] == len(v) + len(mesh_edges(f))
    assert trimesh.Trimesh(v2.numpy(), f2.numpy(), process=False).is_watertight
    torch.testing.assert_close(v2[: len(v)], v)
    torch.testing.assert_close(a["w"][: len(v)], w)
    # every new vertex is an edge midpoint, with the mean of its endpoints' attributes
    e = mesh_edges(f)
    mid_v = (v[e[:, 0]] + v[e[:, 1]]) / 2
    d = torch.cdist(v2[len(v):], mid_v)
    nearest = d.argmin(1)
    assert float(d.min(1).values.max()) < 1e-6
    torch.testing.assert_close(a["w"][len(v):], (w[e[nearest, 0]] + w[e[nearest, 1]]) / 2)


# ----------------------------------------------------------------------------------------------------------------
# a two-bone toy body: a tube along z, bone 0 at the base (z = 0), bone 1 at the elbow (z = 0.3)


def _tube(rings: int = 13, sections: int = 20, length: float = 0.6, radius: float = 0.06):
    z = torch.linspace(0, length, rings, dtype=torch.float64)
    th = torch.arange(sections, dtype=torch.float64) * 2 * math.pi / sections
    ring = torch.stack([torch.cos(th), torch.sin(th)], -1)  # [S, 2]
    v = torch.cat([(radius * ring)[None].expand(rings, -1, -1), z[:, None, None].expand(-1, sections, 1)], -1)
    v = torch.cat([v.reshape(-1, 3), torch.tensor([[0, 0, 0], [0, 0, length]], dtype=torch.float64)])
    f = []
    for r in range(rings - 1):
        for s in range(sections):
            a, b = r * sections + s, r * sections + (s + 1) % sections
            c, d = a + sections, b + sections
            f += [[a, b, d], [a, d, c]]
    bottom, top = rings * sections, rings * sections + 1
    for s in range(sections):
        f.append([bottom, (s + 1) % sections, s])
        f.append([top, (rings - 1) * sections + s, (rings - 1) * sections + (s + 1) % sections])
    return v.float(), torch.tensor(f)


class ToyBody(BodyModel):
    """Two bones with world-axis rotations about their rest heads (the project's pose convention)."""

    name = "toy"
    up_axis = "z"
    bone_names = ("base", "elbow")
    bone_parents = (-1, 0)
    shape_names = ("unused",)

    def __init__(self) -> None:
        super().__init__()
        v, f = _tube()
        w1 = torch.sigmoid((v[:, 2] - 0.3) / 0.03)
        self.register_buffer("faces", f)
        self.register_buffer("skin_indices", torch.tensor([[0, 1]]).expand(len(v), 2).contiguous())
        self.register_buffer("skin_weights", torch.stack([1 - w1, w1], 1).float())
        self.register_buffer("rest_vertices", v)
        self.uvs = self.face_uvs = self.keypoint_regressor = None

    def default_shape(self):
        return torch.zeros(1, dtype=self.dtype)

    def _rest(self, shape):
        B = shape.shape[0]
        heads = torch.tensor([[0.0, 0, 0], [0, 0, 0.3]]).expand(B, 2, 3)
        poses = torch.eye(4).repeat(B, 2, 1, 1)
        poses[..., :3, 3] = heads
        return RestBody(self.rest_vertices.expand(B, -1, -1), heads, poses)

    def _bone_transforms(self, pose, rest):
        R = axis_angle_to_matrix(pose.rotations)  # [B, 2, 3, 3]
        h = rest.bone_heads  # [B, 2, 3]
        T0 = torch.eye(4, dtype=R.dtype).repeat(R.shape[0], 1, 1)
        T0[:, :3, :3] = R[:, 0]
        T0[:, :3, 3] = h[:, 0] - (R[:, 0] @ h[:, 0, :, None])[..., 0] + pose.translation
        L1 = torch.eye(4, dtype=R.dtype).repeat(R.shape[0], 1, 1)
        L1[:, :3, :3] = R[:, 1]
        L1[:, :3, 3] = h[:, 1] - (R[:, 1] @ h[:, 1, :, None])[..., 0]
        T = torch.stack([T0, T0 @ L1], 1)
        return T, T[..., :3, 3] + (T[..., :3, :3] @ h[..., None])[..., 0] - T[..., :3, 3]


def _colors(v):
    th = torch.atan2(v[:, 1], v[:, 0])
    return torch.stack([0.5 + 0.4 * torch.sin(3 * th), 0.5 + 0.4 * torch.cos(20 * v[:, 2]), 0.5 + 0.3 * torch.sin(th + 10 * v[:, 2])], 1)


def _cameras(n: int = 4, size: int = 48):
    ang = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n + 0.3
    centre = torch.tensor([0.0, 0.0, 0.3], dtype=torch.float64)
    eye = torch.stack([0.9 * torch.cos(ang), 0.9 * torch.sin(ang), 0.3 + 0.3 * torch.sin(2 * ang)], -1)
    view = look_at(eye, centre.expand(n, 3), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)).float()
    K = intrinsics_from_fov(40.0, size, size).expand(n, 3, 3).contiguous()
    return view, K


def _views(body, vertices, colors, poses, size=48):
    """Rendered views (image, mask, depth) of the canonical mesh ``vertices`` posed by the true pose of every
    ``(true, given)`` pair in ``poses``; the views carry the given (input) pose."""
    view, K = _cameras(size=size)
    w = body.dense_skin_weights()
    out = []
    for fid, (true, given) in enumerate(poses):
        T, _ = body.bone_transforms(true)
        posed = lbs_points(vertices, w, T[0])
        r = render_mesh(posed, body.faces, colors, view, K, size, size, shading=False)
        for c in range(view.shape[0]):
            out.append(RefineView(r.image[c], r.mask[c].float(), Cameras(view[c], K[c], size, size), given, fid,
                                  depth=r.depth[c]))
    return out


def _chamfer(a, b):
    d = torch.cdist(a.double(), b.double())
    return float((d.min(1).values.mean() + d.min(0).values.mean()) / 2)


@pytest.fixture(scope="module")
def toy():
    return ToyBody()


def _pose(a0, a1, t=(0.0, 0.0, 0.0)):
    return BodyPose(torch.tensor([a0, a1], dtype=torch.float32), torch.tensor(t, dtype=torch.float32))


@pytest.mark.slow
def test_refinement_recovers_the_shape(toy):
    """Target: the tube with a bulge (radius +30% around the elbow, +15% elsewhere). Start: the plain tube. Poses
    are exact; two frames (straight and bent), four cameras, 48x48 images with depth."""
    v0 = toy.rest_vertices
    r = torch.linalg.norm(v0[:, :2], dim=1, keepdim=True)
    bulge = 1.15 + 0.15 * torch.exp(-((v0[:, 2:] - 0.3) / 0.08) ** 2)
    target = torch.cat([v0[:, :2] * bulge, v0[:, 2:]], 1)
    target = torch.where(r > 1e-6, target, v0)
    col = _colors(v0)
    poses = [_pose([0, 0, 0], [0, 0, 0])] * 1 + [_pose([0.1, 0, 0], [0.7, 0.2, 0])]
    views = _views(toy, target, col, [(p, p) for p in poses])
    cfg = MeshRefineConfig(stages=(MeshStage(steps=30, pose=False, lr_vertices=5e-3, smooth=5.0),
                                   MeshStage(steps=10, pose=False, lr_vertices=5e-4, subdivide=True)),
                           w_laplacian=50.0, w_depth=5.0, progress=False)
    before = _chamfer(v0, target)
    out = refine_mesh((v0, toy.faces), toy.dense_skin_weights(), views, toy, cfg, colors=col)
    dense_target = subdivide_mesh(target, toy.faces, {})[0]
    after = _chamfer(out.vertices, dense_target)
    before_dense = _chamfer(subdivide_mesh(v0, toy.faces, {})[0], dense_target)
    assert out.faces.shape[0] == 4 * toy.faces.shape[0]  # subdivided before stage 2
    assert after < 0.5 * before_dense, (before, before_dense, after)
    assert out.history[-1]["silhouette"] < out.history[0]["silhouette"]


@pytest.mark.slow
def test_joint_angle_correction(toy):
    """Input poses off by 10 degrees at the elbow and 5 at the base (random axes); shape and colours known: pose-only
    refinement at least halves the angle error (about 70% in practice)."""
    v0 = toy.rest_vertices
    col = _colors(v0)
    g = torch.Generator().manual_seed(3)
    truths = [_pose([0.0, 0.1, 0.0], [0.6, 0.0, 0.2]), _pose([0.2, -0.1, 0.3], [-0.4, 0.5, 0.0])]
    pairs = []
    for p in truths:
        axis = torch.randn(2, 3, generator=g)
        axis[:, 2] = 0  # swing, not twist: a twist of a round tube is invisible at this size
        axis = axis / axis.norm(dim=1, keepdim=True)
        noise = axis * torch.tensor([[math.radians(5)], [math.radians(10)]])
        R = axis_angle_to_matrix(p.rotations) @ axis_angle_to_matrix(noise)  # in the bone's frame
        from avatar.geometry.rotations import matrix_to_axis_angle

        pairs.append((p, BodyPose(matrix_to_axis_angle(R), p.translation + torch.tensor([0.01, -0.01, 0.0]))))
    views = _views(toy, v0, col, pairs)
    cfg = MeshRefineConfig(stages=(MeshStage(steps=40, vertices=False, colors=False, lr_pose=2e-2),), progress=False)
    out = refine_mesh((v0, toy.faces), toy.dense_skin_weights(), views, toy, cfg, colors=col)

    def err(rot, fid):
        Rt = axis_angle_to_matrix(truths[fid].rotations)
        Re = axis_angle_to_matrix(rot)
        c = ((Re.transpose(-1, -2) @ Rt).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
        return torch.rad2deg(torch.arccos(c.clamp(-1, 1)))

    before = torch.stack([err(pairs[i][1].rotations, i) for i in range(2)]).mean()
    after = torch.stack([err(out.pose_of(i).rotations, i) for i in range(2)]).mean()
    assert abs(float(before) - 7.5) < 0.01
    assert float(after) < 0.5 * float(before), (float(before), float(after))


def test_refine_mesh_bad_input(toy):
    v0 = toy.rest_vertices
    views = _views(toy, v0, _colors(v0), [(_pose([0, 0, 0], [0, 0, 0]),) * 2])
    cfg = MeshRefineConfig(stages=(MeshStage(steps=1),), progress=False)
    with pytest.raises(ValueError, match="skin_weights"):
        refine_mesh((v0, toy.faces), toy.dense_skin_weights()[:, :1], views, toy, cfg)
    with pytest.raises(ValueError, match=r"views\[0\].pose"):
        bad = [RefineView(views[0].image, views[0].mask, views[0].camera, BodyPose.zeros(3), 0)]
        refine_mesh((v0, toy.faces), toy.dense_skin_weights(), bad, toy, cfg)
    with pytest.raises(ValueError, match="stages"):
        refine_mesh((v0, toy.faces), toy.dense_skin_weights(), views, toy, MeshRefineConfig(stages=()))
    with pytest.raises(TypeError, match="canonical_mesh"):
        refine_mesh(v0, toy.dense_skin_weights(), views, toy, cfg)


# ----------------------------------------------------------------------------------------------------------------
# smooth parameterization, uniform Adam, rim term, template wrap


def test_smooth_solver_inverts_and_backward_is_a_solve():
    from avatar.fit.mesh_refine import SmoothSolver

    v, f = _grid(5)
    e = mesh_edges(f)
    s = SmoothSolver(25, e, 10.0)
    u = torch.randn(25, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    x = s.solve(u)
    torch.testing.assert_close(s.apply(x.detach()), u.detach())  # M (M^-1 u) = u
    assert torch.autograd.gradcheck(s.solve, (u,))
    # a constant displacement is not smoothed (L 1 = 0)
    torch.testing.assert_close(s.solve(torch.ones(25, 3, dtype=torch.float64)), torch.ones(25, 3, dtype=torch.float64))


def test_uniform_adam_step_is_proportional_to_the_gradient():
    from avatar.fit.mesh_refine import UniformAdam

    p = torch.nn.Parameter(torch.zeros(3))
    opt = UniformAdam([p], lr=0.1)
    p.grad = torch.tensor([1.0, 0.1, 0.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, -0.01, 0.0]), atol=1e-6, rtol=1e-5)


def test_mask_sdf_zero_level_between_pixel_centres():
    from avatar.fit.mesh_refine import mask_sdf

    m = torch.zeros(1, 6, 8)
    m[0, :, :3] = 1  # columns 0..2 inside: the edge lies at x = 3 (between centres 2.5 and 3.5)
    d = mask_sdf(m)[0]
    torch.testing.assert_close(d[2, 2], torch.tensor(0.5))
    torch.testing.assert_close(d[2, 3], torch.tensor(-0.5))
    torch.testing.assert_close(d[2, 0], torch.tensor(2.5))
    with pytest.raises(ValueError, match="masks"):
        mask_sdf(m[0])


def test_rim_loss_zero_on_the_target_and_pushes_outward_inside():
    from avatar.fit.mesh_refine import mask_sdf, rim_loss

    m = torch.zeros(1, 6, 8)
    m[0, :, :3] = 1
    sdf = mask_sdf(m)
    on_edge = torch.tensor([[[3.0, 2.5]]], requires_grad=True)
    rim = torch.ones(1, 1, dtype=torch.bool)
    assert float(rim_loss(on_edge, rim, sdf)) < 1e-12
    inside = torch.tensor([[[2.2, 2.5]]], requires_grad=True)
    loss = rim_loss(inside, rim, sdf)
    loss.backward()
    assert float(loss) > 0 and float(inside.grad[0, 0, 0]) < 0  # descending moves the point to larger x: outward


def test_wrap_template_recovers_normal_offsets():
    import trimesh

    from avatar.fit.mesh_refine import wrap_template
    from avatar.render.mesh import vertex_normals

    m = trimesh.creation.icosphere(subdivisions=3, radius=0.2)
    v = torch.from_numpy(np.asarray(m.vertices)).float()
    f = torch.from_numpy(np.asarray(m.faces, np.int64))
    n = vertex_normals(v, f)
    true = 0.02 + 0.01 * v[:, 2] / 0.2  # a smooth 1-3 cm offset field
    target = v + true[:, None] * n
    off = wrap_template(v, f, target, f, smooth_iters=2, num_samples=100_000)
    assert float((off - true).abs().mean()) < 1.5e-3, float((off - true).abs().mean())


def test_rim_refinement_keeps_the_true_shape(toy):
    """Started from the true shape with exact poses, the default losses (rim, photometric) must not move it away:
    the check that caught the old soft-silhouette term inflating the surface."""
    v0 = toy.rest_vertices
    col = _colors(v0)
    poses = [_pose([0, 0, 0], [0, 0, 0]), _pose([0.1, 0, 0], [0.7, 0.2, 0])]
    views = _views(toy, v0, col, [(p, p) for p in poses])
    cfg = MeshRefineConfig(stages=(MeshStage(steps=15, pose=False, smooth=5.0, lr_vertices=1e-3),), progress=False)
    out = refine_mesh((v0, toy.faces), toy.dense_skin_weights(), views, toy, cfg, colors=col)
    assert _chamfer(out.vertices, v0) < 2e-3, _chamfer(out.vertices, v0)


# ----------------------------------------------------------------------------------------------------------------
# one pose correction per anatomical joint


def test_joint_groups_merge_twin_chains_and_skip_minor_bones():
    from avatar.fit.mesh_refine import joint_groups

    names = ("root", "spine02", "spine01", "upperarm01.L", "upperarm02.L", "wrist.L", "finger1-1.L", "neck01", "eye.L")
    parents = (-1, 0, 1, 2, 3, 4, 5, 2, 7)
    groups = joint_groups(names, parents)
    assert set(groups) == {(0,), (1, 2), (3, 4), (5,), (7,)}  # root first in each chain, fingers and eyes dropped
    assert set(joint_groups(names, parents, merge_twins=False)) == {(0,), (1,), (2,), (3,), (4,), (5,), (7,)}
    # twins that are not one parent chain stay separate
    assert set(joint_groups(("a01", "a02", "b"), (-1, -1, 0), exclude=())) == {(0,), (1,), (2,)}
    with pytest.raises(ValueError, match="parents"):
        joint_groups(names, parents[:-1])


def test_apply_joint_deltas_turns_each_chain_product_by_the_delta():
    from avatar.fit.mesh_refine import apply_joint_deltas, joint_rotations
    from avatar.geometry.rotations import matrix_to_axis_angle

    g = torch.Generator().manual_seed(0)
    rot = 0.5 * torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    groups = ((0,), (1, 2, 3), (4, 5))
    d = 0.3 * torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    out = apply_joint_deltas(rot, d, groups)
    D = axis_angle_to_matrix(d)
    # every chain's product turns by exactly D (left, in the chain's parent frame)
    torch.testing.assert_close(joint_rotations(out, groups), D @ joint_rotations(rot, groups))
    # a single bone: R' = D R; and each twin of a chain gets an even share: P_1' = D^(1/3) P_1
    torch.testing.assert_close(axis_angle_to_matrix(out[:, 0]), D[:, 0] @ axis_angle_to_matrix(rot[:, 0]))
    torch.testing.assert_close(axis_angle_to_matrix(out[:, 1]),
                               axis_angle_to_matrix(d[:, 1] / 3) @ axis_angle_to_matrix(rot[:, 1]))
    # zero deltas leave the pose; bones in no group keep theirs
    torch.testing.assert_close(matrix_to_axis_angle(axis_angle_to_matrix(apply_joint_deltas(rot, torch.zeros_like(d), groups))),
                               matrix_to_axis_angle(axis_angle_to_matrix(rot)))
    out2 = apply_joint_deltas(rot, d[:, :2], groups[:2])
    torch.testing.assert_close(out2[:, 4:], rot[:, 4:])
    # differentiable in the deltas
    dd = d.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: apply_joint_deltas(rot, x, groups), (dd,))
    with pytest.raises(ValueError, match="deltas"):
        apply_joint_deltas(rot, d[:, :2], groups)
