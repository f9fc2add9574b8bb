"""Depth layers against a brute-force ray/triangle reference; back-projection as the inverse of projection."""

import math

import numpy as np
import pytest
import torch
import trimesh

from avatar.geometry.projection import intrinsics_from_fov, look_at, project_points
from avatar.predict.views import DepthLayers, backproject, render_depth_layers

W, H = 40, 32


def _camera(eye=(0.3, -2.5, 0.2), target=(0.0, 0.0, 0.0)):
    view = look_at(torch.tensor([eye], dtype=torch.float64), torch.tensor([target], dtype=torch.float64),
                   torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))[0]
    K = intrinsics_from_fov(40.0, W, H, dtype=torch.float64)
    K[0, 1] = 0.7  # a little skew: backproject must honour every intrinsic
    return view, K


def _two_spheres():
    """An icosphere and a second, larger one behind it that it partly hides: the back layer must be the farthest
    surface (the far sphere's back), not the second hit."""
    a = trimesh.creation.icosphere(subdivisions=2, radius=0.35)
    b = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    va = torch.tensor(a.vertices) + torch.tensor([0.15, -0.3, 0.05])
    vb = torch.tensor(b.vertices) + torch.tensor([-0.1, 0.6, 0.0])
    verts = torch.cat([va, vb])
    faces = torch.cat([torch.tensor(a.faces), torch.tensor(b.faces) + len(va)]).long()
    return verts, faces


def _reference_layers(verts, faces, view, K):
    """Brute force: every pixel-centre ray against every triangle (Moller-Trumbore, float64), min and max camera z
    of the hits."""
    R, t = view[:3, :3].numpy(), view[:3, 3].numpy()
    centre = -R.T @ t
    Kn = K.numpy()
    yy, xx = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    y = (yy - Kn[1, 2]) / Kn[1, 1]
    x = (xx - Kn[0, 2] - Kn[0, 1] * y) / Kn[0, 0]
    dirs_cam = np.stack([x, y, np.ones_like(x)], -1).reshape(-1, 3)  # z = 1: ray parameter is camera z
    dirs = dirs_cam @ R  # world
    v = verts.numpy()[faces.numpy()]  # [F, 3, 3]
    e1, e2 = v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]
    p = np.cross(dirs[:, None], e2[None])  # [P, F, 3]
    det = (p * e1[None]).sum(-1)
    ok = np.abs(det) > 1e-12
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    s = centre[None, None] - v[None, :, 0]
    u = (s * p).sum(-1) * inv
    q = np.cross(s, e1[None])
    w = (dirs[:, None] * q).sum(-1) * inv
    tt = (e2[None] * q).sum(-1) * inv
    hit = ok & (u >= 0) & (w >= 0) & (u + w <= 1) & (tt > 0)
    front = np.where(hit, tt, np.inf).min(1)
    back = np.where(hit, tt, -np.inf).max(1)
    mask = hit.any(1)
    # pixels whose ray passes within a hair of a triangle edge are ambiguous (the rasterizer's tie rule decides)
    margin = np.minimum(np.minimum(u, w), 1 - u - w)
    near_edge = (hit | (margin > -1e-6)) & ok & (margin < 1e-6) & (tt > 0)
    return (mask.reshape(H, W), np.where(mask, front, 0).reshape(H, W), np.where(mask, back, 0).reshape(H, W),
            near_edge.any(1).reshape(H, W))


def test_depth_layers_match_brute_force():
    verts, faces = _two_spheres()
    view, K = _camera()
    layers = render_depth_layers(verts, faces, view, K, W, H)
    assert isinstance(layers, DepthLayers)
    mask, front, back, ambiguous = _reference_layers(verts, faces, view, K)
    ok = ~ambiguous
    assert mask.sum() > 150 and ok.mean() > 0.95
    np.testing.assert_array_equal(layers.mask.numpy()[ok], mask[ok])
    np.testing.assert_allclose(layers.depth_front.numpy()[ok], front[ok], atol=1e-9)
    np.testing.assert_allclose(layers.depth_back.numpy()[ok], back[ok], atol=1e-9)
    # the back layer really sees the far sphere behind the near one: depth gaps far larger than one sphere
    assert (layers.depth_back - layers.depth_front).max() > 1.0
    assert ((layers.depth_back >= layers.depth_front) | ~layers.mask).all()


def test_attributes_and_backprojection_are_consistent():
    verts, faces = _two_spheres()
    view, K = _camera(eye=(-1.8, -1.9, 0.6))
    layers = render_depth_layers(verts, faces, view, K, W, H, vertex_attrs=verts)  # attributes = world positions
    m = layers.mask
    for depth, attrs in ((layers.depth_front, layers.attrs_front), (layers.depth_back, layers.attrs_back)):
        pts = backproject(depth, K, view)
        # perspective-correct interpolation of positions over a flat triangle is the exact ray hit
        torch.testing.assert_close(pts[m], attrs[m], atol=1e-9, rtol=0)
        assert (attrs[~m] == 0).all()
        # projecting back gives the pixel centres and the depth
        uv, z = project_points(pts[m], view, K)
        jj, ii = torch.nonzero(m, as_tuple=True)
        torch.testing.assert_close(uv, torch.stack([ii, jj], -1).double() + 0.5, atol=1e-9, rtol=0)
        torch.testing.assert_close(z, depth[m], atol=1e-12, rtol=0)


def test_backproject_inverts_projection_float32():
    view, K = _camera(eye=(2.0, 1.0, 1.5))
    g = torch.Generator().manual_seed(0)
    depth = (1.5 + torch.rand(H, W, generator=g, dtype=torch.float64)).float()
    pts = backproject(depth, K.float(), view.float())
    uv, z = project_points(pts.reshape(-1, 3), view.float(), K.float())
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    torch.testing.assert_close(uv, torch.stack([xx, yy], -1).reshape(-1, 2).float(), atol=2e-4, rtol=0)
    torch.testing.assert_close(z, depth.reshape(-1), atol=1e-5, rtol=0)


def test_single_face_layers_agree_and_near_plane():
    view, K = _camera()
    tri = torch.tensor([[-0.3, 0.0, -0.3], [0.3, 0.0, -0.2], [0.0, 0.0, 0.3]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    layers = render_depth_layers(tri, faces, view, K, W, H)
    assert layers.mask.sum() > 20
    torch.testing.assert_close(layers.depth_front, layers.depth_back)
    # a triangle crossing the camera's near plane is dropped from both layers (the rasterizer's rule)
    eye = -view[:3, :3].T @ view[:3, 3]
    close = torch.stack([eye + torch.tensor([0.0, 0.005, 0.0], dtype=torch.float64), tri[1], tri[2]])
    layers = render_depth_layers(close, faces, view, K, W, H)
    assert not layers.mask.any() and (layers.depth_back == 0).all()


def test_bad_inputs():
    verts, faces = _two_spheres()
    view, K = _camera()
    with pytest.raises(ValueError, match="viewmat"):
        render_depth_layers(verts, faces, view[:3], K, W, H)
    with pytest.raises(ValueError, match="vertex_attrs"):
        render_depth_layers(verts, faces, view, K, W, H, vertex_attrs=verts[:5])
    with pytest.raises(ValueError, match="faces"):
        render_depth_layers(verts, faces + len(verts), view, K, W, H)
    with pytest.raises(ValueError, match="depth"):
        backproject(torch.zeros(3, 4, 2), K, view)
    assert math.isfinite(float(render_depth_layers(verts, faces, view, K, W, H).depth_back.sum()))
