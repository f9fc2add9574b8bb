"""Canonicalization and fusion: analytic shapes, a rigid-motion reference, a synthetic subject (oracle), bad input."""

import math

import numpy as np

import pytest
import torch
import trimesh

from avatar.fusion import (
    CanonicalPoints,
    FusionConfig,
    ViewLayers,
    body_template,
    canonicalize_view,
    fuse_points,
    fuse_views,
    mesh_quality,
    oracle_views,
)
from avatar.geometry.projection import intrinsics_from_fov, look_at
from avatar.geometry.rotations import axis_angle_to_matrix
from avatar.predict.skin_codes import SkinCodec
from avatar.predict.views import render_depth_layers
from avatar.types import Cameras


def _cameras(eyes, size=96, target=(0.0, 0.0, 0.0), fov=35.0):
    eye = torch.tensor(eyes, dtype=torch.float64)
    view = look_at(eye, torch.tensor(target, dtype=torch.float64).expand_as(eye), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    K = intrinsics_from_fov(fov, size, size, dtype=torch.float64).expand(len(eyes), 3, 3)
    return Cameras(view, K.contiguous(), size, size)


def _codec(num_bones=2):
    torch.manual_seed(0)
    return SkinCodec(num_bones).eval()


def _rigid(J, R, t):
    T = torch.eye(4, dtype=torch.float64).repeat(J, 1, 1)
    T[:, :3, :3] = R
    T[:, :3, 3] = t
    return T


def test_sphere_points_fuse_to_the_sphere_with_their_weights():
    """Exact oriented points on a sphere (weights: bone 0 on the upper half, bone 1 below) -> the fused surface is the
    sphere to a fraction of a voxel and every vertex far from the equator gets its half's bone."""
    g = torch.Generator().manual_seed(0)
    n = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    n = n / n.norm(dim=-1, keepdim=True)
    r = 0.3
    w = torch.stack([(n[:, 2] > 0).double(), (n[:, 2] <= 0).double()], -1)
    cloud = CanonicalPoints(r * n, n, w, torch.ones(20000, dtype=torch.float64), torch.zeros(20000, dtype=torch.long),
                            torch.zeros(20000, dtype=torch.long))
    cfg = FusionConfig(voxel_size=0.02, sigma=0.02, band=0.06)
    fused = fuse_points(cloud, cfg)
    radius = fused.vertices.norm(dim=-1)
    assert float((radius - r).abs().max()) < 0.25 * cfg.voxel_size
    assert fused.to_trimesh().is_watertight and fused.to_trimesh().volume > 0  # closed, outward faces
    torch.testing.assert_close(fused.skin_weights.sum(-1), torch.ones(len(radius), dtype=torch.float64))
    z = fused.vertices[:, 2] / radius
    assert float(fused.skin_weights[z > 0.2, 0].min()) > 0.999 and float(fused.skin_weights[z < -0.2, 1].min()) > 0.999
    assert float(fused.data_support.min()) == 1.0  # no template: all data


def test_box_from_one_oblique_view_is_closed_by_the_back_layer():
    """A box seen from one camera at a corner: the front layer sees three faces, the back layer the other three; the
    fused mesh matches the box (identity bone transforms: canonical = world)."""
    box = trimesh.creation.box(extents=(0.5, 0.4, 0.6))
    verts = torch.tensor(box.vertices)
    faces = torch.tensor(box.faces).long()
    cams = _cameras([(1.6, -1.4, 1.2)], size=128)
    codec = _codec()
    codes = torch.full((len(verts), 3), 0.5, dtype=torch.float64)
    lay = render_depth_layers(verts, faces, cams.viewmats[0], cams.Ks[0], 128, 128, vertex_attrs=codes)
    view = ViewLayers(lay.mask, lay.depth_front, lay.depth_back, lay.attrs_front, lay.attrs_back)
    T = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    cfg = FusionConfig(voxel_size=0.015, sigma=0.012, band=0.04, k=8, max_step_px=3.0)
    fused = fuse_views([view], cams, T, codec, cfg)
    q = mesh_quality(fused.vertices, fused.faces, verts, faces, num_samples=20000)
    assert q.chamfer_mm < 6.0 and q.normal_consistency > 0.95 and fused.to_trimesh().is_watertight
    lo, hi = fused.vertices.min(0).values, fused.vertices.max(0).values
    torch.testing.assert_close(hi - lo, torch.tensor([0.5, 0.4, 0.6], dtype=torch.float64), atol=2 * cfg.voxel_size, rtol=0)


def test_canonicalize_inverts_a_rigid_pose_exactly():
    """All bones share one rigid transform: inverse LBS is that transform's inverse whatever the decoded weights;
    points and normals must match the canonical sphere's."""
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    canon = torch.tensor(sphere.vertices)
    R = axis_angle_to_matrix(torch.tensor([0.3, -0.5, 0.9], dtype=torch.float64))
    t = torch.tensor([0.2, 0.1, -0.3], dtype=torch.float64)
    posed = canon @ R.T + t
    cams = _cameras([(0.2, -2.0, 0.3)], size=80)
    codec = _codec(3)
    lay = render_depth_layers(posed, torch.tensor(sphere.faces).long(), cams.viewmats[0], cams.Ks[0], 80, 80,
                              vertex_attrs=torch.rand(len(canon), 3, dtype=torch.float64))
    pts = canonicalize_view(lay.mask, lay.depth_front, lay.depth_back, lay.attrs_front, lay.attrs_back, cams.Ks[0],
                            cams.viewmats[0], _rigid(3, R, t), codec)
    assert len(pts) > 1000 and set(pts.layer.tolist()) == {0, 1}
    radius = pts.points.norm(dim=-1)
    assert float((radius - 0.3).abs().max()) < 0.003  # flat facets of the icosphere: at most its sagitta
    cos = (pts.normals * pts.points / radius[:, None]).sum(-1)  # outward normals on both layers
    assert float(cos.min()) > 0.95
    torch.testing.assert_close(pts.weights.sum(-1), torch.ones(len(pts), dtype=torch.float64))


def test_bad_inputs():
    cams = _cameras([(0.0, -2.0, 0.0), (2.0, 0.0, 0.0)], size=32)
    codec = _codec()
    z = torch.zeros(32, 32, dtype=torch.float64)
    view = ViewLayers(torch.zeros(32, 32, dtype=torch.bool), z, z, torch.zeros(32, 32, 3), torch.zeros(32, 32, 3))
    T = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    with pytest.raises(ValueError, match="1 views but 2 cameras"):
        fuse_views([view], cams, T, codec)
    with pytest.raises(ValueError, match=r"view 0 is \(16, 16\)"):
        small = ViewLayers(torch.zeros(16, 16, dtype=torch.bool), z[:16, :16], z[:16, :16], torch.zeros(16, 16, 3),
                           torch.zeros(16, 16, 3))
        fuse_views([small, small], cams, T, codec)
    with pytest.raises(ValueError, match="codes_back must be"):
        bad = ViewLayers(view.mask, z, z, view.codes_front, torch.zeros(32, 32, 2))
        fuse_views([view, bad], cams, T, codec)
    with pytest.raises(ValueError, match="transforms must be"):
        fuse_views([view, view], cams, T[:, :3], codec)
    with pytest.raises(TypeError, match="lacks"):
        fuse_views([view, object()], cams, T, codec)
    with pytest.raises(ValueError, match="at least 4 oriented points"):
        fuse_views([view, view], cams, T, codec)  # empty masks
    with pytest.raises(ValueError, match="voxel_size"):
        fuse_points(CanonicalPoints(*(torch.zeros(5, 3),) * 2, torch.ones(5, 2) / 2, torch.ones(5),
                                    torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)),
                    FusionConfig(voxel_size=0.0))


@pytest.mark.slow
def test_oracle_fusion_of_a_synthetic_subject_beats_the_template(anny_body):
    """Ground-truth depth layers and codes (shipped codec) of a posed clothed subject from 4 views: the fused canonical
    mesh is >= 30% closer (Chamfer) to the clothed ground truth than the naked template; 1 and 2 views also fuse."""
    from avatar.data.synthetic import SyntheticConfig, make_subject, posed_vertices
    from avatar.predict.skin_codes import load_skin_codec, shipped_codec_path

    if not shipped_codec_path().is_file():
        pytest.skip("the shipped codec has not been trained yet")
    codec = load_skin_codec()
    ring = (0, 6, 12, 17)
    sub = make_subject(SyntheticConfig(seed=3, motion="free", num_frames=18, width=128, height=128, rig="ring23",
                                       cameras=ring, texture_size=32), anny_body)
    verts = posed_vertices(sub, anny_body, 17)
    template = body_template(anny_body, sub.shape)
    q_t = mesh_quality(template.vertices, template.faces, sub.canonical_vertices, sub.faces, num_samples=10000)
    cfg = FusionConfig(voxel_size=0.015)
    views = oracle_views(verts, sub.faces, anny_body.dense_skin_weights(), sub.cameras, codec)
    fused = fuse_views(views, sub.cameras, sub.bone_transforms[17], codec, cfg, template)
    q = mesh_quality(fused.vertices, fused.faces, sub.canonical_vertices, sub.faces, num_samples=10000)
    assert q.chamfer_mm <= 0.7 * q_t.chamfer_mm, (q, q_t)
    torch.testing.assert_close(fused.skin_weights.sum(-1), torch.ones(len(fused.vertices)))
    # skinning weights transferred to the mesh agree with the ground truth's nearest vertex on most of the surface
    from scipy.spatial import cKDTree

    _, nn = cKDTree(sub.canonical_vertices.numpy()).query(fused.vertices.numpy())
    gt_w = anny_body.dense_skin_weights()[torch.from_numpy(nn)]
    assert float((fused.skin_weights - gt_w).abs().sum(-1).median()) < 0.5
    one = fuse_views(views[:1], Cameras(sub.cameras.viewmats[:1], sub.cameras.Ks[:1], 128, 128),
                     sub.bone_transforms[17], codec, cfg, template)
    assert one.faces.shape[0] > 1000 and math.isfinite(float(one.vertices.sum()))
    assert float(one.data_support.mean()) < float(fused.data_support.mean())  # one view leaves more to the template


def test_mesh_quality_of_concentric_spheres():
    """Two concentric spheres 1 cm apart: Chamfer about 10 mm both ways, normals agree."""
    a = trimesh.creation.icosphere(subdivisions=4, radius=0.30)
    b = trimesh.creation.icosphere(subdivisions=4, radius=0.31)
    q = mesh_quality(torch.tensor(a.vertices), torch.tensor(a.faces), torch.tensor(b.vertices), torch.tensor(b.faces),
                     num_samples=20000)
    # facets of the two icospheres: the gap between them varies by less than a millimetre around 10 mm
    assert 9.0 < q.accuracy_mm < 10.5 and 9.0 < q.completeness_mm < 10.5 and q.normal_consistency > 0.99
    same = mesh_quality(torch.tensor(a.vertices), torch.tensor(a.faces), torch.tensor(a.vertices), torch.tensor(a.faces),
                        num_samples=20000)
    assert same.chamfer_mm < 0.2 and same.normal_consistency > 0.9999  # distances to the surface, not to samples
    with pytest.raises(ValueError, match="non-empty faces"):
        mesh_quality(torch.tensor(a.vertices), torch.zeros(0, 3, dtype=torch.long), torch.tensor(b.vertices),
                     torch.tensor(b.faces))


def test_closest_point_on_triangles_matches_a_dense_search():
    from avatar.fusion.quality import closest_point_on_triangles

    rng = np.random.default_rng(0)
    tri = rng.normal(size=(40, 3, 3))
    p = rng.normal(size=(40, 3)) * 1.5
    q = closest_point_on_triangles(p, tri[:, 0], tri[:, 1], tri[:, 2])
    u, v = np.meshgrid(np.linspace(0, 1, 301), np.linspace(0, 1, 301))
    keep = u + v <= 1
    u, v = u[keep], v[keep]
    dense = tri[:, None, 0] + u[None, :, None] * (tri[:, None, 1] - tri[:, None, 0]) + v[None, :, None] * (tri[:, None, 2] - tri[:, None, 0])
    best = np.linalg.norm(dense - p[:, None], axis=-1).min(1)
    got = np.linalg.norm(q - p, axis=-1)
    assert np.all(got <= best + 1e-12) and np.allclose(got, best, atol=2e-2)
