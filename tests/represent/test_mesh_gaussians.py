"""Gaussians bound to mesh faces: they follow the mesh exactly, rotations are proper, scales follow the face size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar.geometry.rotations import axis_angle_to_matrix, quat_to_matrix
from avatar.represent.avatar import GaussianAvatar
from avatar.represent.mesh_gaussians import avatar_from_mesh, bind_to_faces, face_frames, mesh_gaussians
from avatar.skinning.lbs import lbs_points


@pytest.fixture
def sphere():
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=2)
    v = torch.from_numpy(np.asarray(m.vertices)).double()
    f = torch.from_numpy(np.asarray(m.faces, np.int64))
    g = torch.Generator().manual_seed(5)
    v = v * torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64) + 0.01 * torch.randn(v.shape, generator=g,
                                                                                    dtype=torch.float64)
    return v, f, torch.rand(len(v), 3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 3, 4, 7])
def test_rigid_motion_moves_gaussians_rigidly(sphere, k):
    v, f, c = sphere
    b = bind_to_faces(len(f), k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b = type(b)(b.face_ids, b.bary, b.rel_scales, b.local_quats, torch.full_like(b.normal_offset, 0.2), k)
    g0 = mesh_gaussians(v, f, b, c)
    R = axis_angle_to_matrix(torch.tensor([0.4, -1.1, 0.7], dtype=torch.float64))
    t = torch.tensor([0.5, -0.2, 1.0], dtype=torch.float64)
    g1 = mesh_gaussians(v @ R.T + t, f, b, c)
    torch.testing.assert_close(g1.means, g0.means @ R.T + t, atol=1e-12, rtol=0)
    torch.testing.assert_close(quat_to_matrix(g1.quats), R @ quat_to_matrix(g0.quats), atol=1e-12, rtol=0)
    torch.testing.assert_close(g1.scales, g0.scales, atol=1e-12, rtol=0)
    torch.testing.assert_close(g1.colors, g0.colors)


def test_rotations_orthonormal_and_aligned_with_faces(sphere):
    v, f, c = sphere
    frames, area = face_frames(v, f)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(frames.transpose(-1, -2) @ frames, eye.expand_as(frames), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(frames), torch.ones(len(f), dtype=torch.float64), atol=1e-12, rtol=0)
    g = mesh_gaussians(v, f, bind_to_faces(len(f), 1, dtype=torch.float64), c)
    R = quat_to_matrix(g.quats)
    torch.testing.assert_close(R, frames, atol=1e-10, rtol=0)
    # third axis is the face normal: orthogonal to both edges; the centroid Gaussian sits at the centroid
    tri = v[f]
    for e in (tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]):
        assert float((R[..., 2] * e).sum(-1).abs().max()) < 1e-12
    torch.testing.assert_close(g.means, tri.mean(1))
    # scales are the relative scales times sqrt(area / k)
    torch.testing.assert_close(g.scales, torch.tensor([0.6, 0.6, 0.05], dtype=torch.float64) * area.sqrt()[:, None])


def test_gaussians_follow_a_skinned_mesh(sphere):
    """Skinning the mesh and rebuilding the Gaussians: positions equal the skinned points at the same barycentrics
    (the mesh's faces are flat, so barycentric positions commute with per-vertex skinning), rotations stay proper."""
    v, f, c = sphere
    w = torch.stack([torch.sigmoid(10 * v[:, 2]), 1 - torch.sigmoid(10 * v[:, 2])], 1)
    T = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    T[0, :3, :3] = axis_angle_to_matrix(torch.tensor([0.0, 0.6, 0.0], dtype=torch.float64))
    posed = lbs_points(v, w, T)
    b = bind_to_faces(len(f), 4, dtype=torch.float64)
    g = mesh_gaussians(posed, f, b, c, skin_weights=w)
    ref = (b.bary[..., None] * posed[f[b.face_ids]]).sum(1)
    torch.testing.assert_close(g.means, ref)
    R = quat_to_matrix(g.quats)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, torch.eye(3, dtype=torch.float64).expand_as(R), atol=1e-12,
                               rtol=0)
    torch.testing.assert_close(g.skin_weights.sum(-1), torch.ones(len(g), dtype=torch.float64))


def test_avatar_from_mesh(sphere):
    v, f, c = sphere
    v, c = v.float(), c.float()
    w = torch.softmax(torch.randn(len(v), 5, generator=torch.Generator().manual_seed(1)), -1)
    a = avatar_from_mesh(v, f, w, c, num_gaussians=3 * len(f), body_vertices=v, generator=torch.Generator().manual_seed(0))
    assert isinstance(a, GaussianAvatar) and a.num_gaussians == 3 * len(f)
    ref = mesh_gaussians(v, f, bind_to_faces(len(f), 3), c, skin_weights=w)
    torch.testing.assert_close(a.means.detach(), ref.means)
    torch.testing.assert_close(a.canonical().scales.detach(), ref.scales)
    torch.testing.assert_close(a.base_weights, ref.skin_weights)
    torch.testing.assert_close(torch.sigmoid(a.color_logits.detach()), ref.colors, atol=1e-4, rtol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="num_faces and k"):
        bind_to_faces(0, 1)
    with pytest.raises(ValueError, match="generator"):
        bind_to_faces(10, 5)
    v = torch.rand(4, 3)
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    with pytest.raises(ValueError, match="refers to face"):
        mesh_gaussians(v, f[:1], bind_to_faces(2, 1), torch.rand(4, 3))
    with pytest.raises(ValueError, match="colors"):
        mesh_gaussians(v, f, bind_to_faces(2, 1), torch.rand(3, 3))


def test_fit_job_can_start_from_a_refined_mesh():
    """``build_avatar(..., init_mesh=...)`` (the opt-in hook of the fitting job) starts from the mesh-bound Gaussians
    of the refined mesh; without it the job starts from the body as before."""
    from types import SimpleNamespace

    from avatar.fit.job import build_avatar
    from avatar.fit.mesh_refine import RefinedMesh
    from avatar.fit.trainer import FitConfig
    from avatar.types import BodyPose
    from tests.fit.test_mesh_refine import ToyBody

    body = ToyBody()
    v, f = body.rest_vertices * 1.1, body.faces
    w = body.dense_skin_weights()
    c = torch.rand(len(v), 3, generator=torch.Generator().manual_seed(2))
    mesh = RefinedMesh(v, f, c, w, (0,), BodyPose.zeros(2, (1,)))
    cfg = FitConfig(num_gaussians=2 * len(f), weight_field=False)
    frames = [SimpleNamespace(shape=body.default_shape())]
    a = build_avatar(frames, body, cfg, torch.eye(4).repeat(1, 2, 1, 1), init_mesh=mesh)
    ref = mesh_gaussians(v, f, bind_to_faces(len(f), 2, generator=torch.Generator().manual_seed(cfg.seed)), c,
                         skin_weights=w)
    torch.testing.assert_close(a.means.detach(), ref.means)
    torch.testing.assert_close(a.base_weights, ref.skin_weights)
    torch.testing.assert_close(a.body_vertices, body.rest_vertices)  # pruning still measures against the body
