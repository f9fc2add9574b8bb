import subprocess
import sys

import numpy as np
import pytest
import torch

from avatar.render.mesh import (
    Fragments,
    interpolate,
    rasterize,
    rasterize_visibility,
    render_mesh,
    soft_silhouette,
    texture_sample,
)

W, H = 32, 24


def camera(f=30.0, w=W, h=H, dtype=torch.float64):
    """Identity view (camera at the origin looking down +z) and a pinhole with the principal point at the centre."""
    V = torch.eye(4, dtype=dtype)[None]
    K = torch.tensor([[f, 0.0, w / 2], [0.0, f, h / 2], [0.0, 0.0, 1.0]], dtype=dtype)[None]
    return V, K


def random_soup(gen, n_tri=6):
    """Overlapping random triangles in front of the identity camera (camera space = world space)."""
    z = 1.0 + 2.0 * torch.rand(n_tri * 3, generator=gen, dtype=torch.float64)
    xy = (torch.rand(n_tri * 3, 2, generator=gen, dtype=torch.float64) - 0.5) * torch.tensor([1.2, 0.9]) * z[:, None]
    verts = torch.cat([xy, z[:, None]], -1)
    faces = torch.arange(n_tri * 3).reshape(n_tri, 3)
    return verts, faces


def brute_force(pix, z, faces, w, h):
    """Per-pixel reference: inside test with barycentrics, nearest perspective-correct depth."""
    ids = np.full((h, w), -1)
    depth = np.zeros((h, w))
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    best = np.full((h, w), np.inf)
    for fi, (a, b, c) in enumerate(faces):
        pa, pb, pc = pix[a], pix[b], pix[c]
        area = (pb[0] - pa[0]) * (pc[1] - pa[1]) - (pb[1] - pa[1]) * (pc[0] - pa[0])
        if area == 0:
            continue
        l0 = ((pb[0] - xs) * (pc[1] - ys) - (pb[1] - ys) * (pc[0] - xs)) / area
        l1 = ((pc[0] - xs) * (pa[1] - ys) - (pc[1] - ys) * (pa[0] - xs)) / area
        l2 = 1 - l0 - l1
        inside = (l0 >= 0) & (l1 >= 0) & (l2 >= 0)
        zz = 1.0 / (l0 / z[a] + l1 / z[b] + l2 / z[c])
        take = inside & (zz < best)
        best[take] = zz[take]
        ids[take] = fi
    depth[ids >= 0] = best[ids >= 0]
    return ids, depth


@pytest.fixture(scope="module", autouse=True)
def warm_kernels():
    """Compile (or load from numba's cache) the kernels once for the module."""
    V, K = camera()
    verts = torch.tensor([[0.0, 0.0, 2.0], [0.5, 0.0, 2.0], [0.0, 0.5, 2.0]], dtype=torch.float64)
    rasterize(verts, torch.tensor([[0, 1, 2]]), V, K, 8, 8)


@pytest.mark.parametrize("seed", range(5))
def test_visibility_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    verts, faces = random_soup(gen, n_tri=8)
    V, K = camera()
    frags = rasterize(verts, faces, V, K, W, H)
    pix = verts[:, :2] / verts[:, 2:] * 30.0 + torch.tensor([W / 2, H / 2], dtype=torch.float64)
    ref_ids, ref_depth = brute_force(pix.numpy(), verts[:, 2].numpy(), faces.numpy(), W, H)
    ids = frags.face_ids[0].numpy()
    assert (ref_ids >= 0).sum() > 50  # the test is not vacuous
    assert (ids == ref_ids).mean() >= 0.995
    both = (ids == ref_ids) & (ids >= 0)
    np.testing.assert_allclose(frags.depth[0].detach().numpy()[both], ref_depth[both], atol=1e-4)
    assert (frags.depth[0][ids < 0] == 0).all() and (frags.bary[0][ids < 0] == 0).all()


def test_shared_edge_through_pixel_centres_is_covered_exactly_once():
    # a screen-aligned square split along its diagonal, which runs exactly through pixel centres
    V, K = camera(f=10.0, w=16, h=16)
    corners = torch.tensor([[2.0, 2.0], [14.0, 2.0], [14.0, 14.0], [2.0, 14.0]], dtype=torch.float64)
    z = 2.0
    verts = torch.cat([(corners - 8.0) / 10.0 * z, torch.full((4, 1), z, dtype=torch.float64)], -1)
    quad = torch.tensor([[0, 1, 2], [0, 2, 3]])
    a = rasterize(verts, quad[:1], V, K, 16, 16).mask[0]
    b = rasterize(verts, quad[1:], V, K, 16, 16).mask[0]
    both = rasterize(verts, quad, V, K, 16, 16).mask[0]
    assert not (a & b).any()  # no pixel owned twice
    assert torch.equal(a | b, both)  # and none lost
    assert both.sum() == 12 * 12
    # the reversed winding covers the same pixels
    assert torch.equal(rasterize(verts, quad.flip(-1), V, K, 16, 16).mask[0], both)


def test_barycentrics_sum_to_one_and_reproduce_pixel_centres(gen):
    verts, faces = random_soup(gen, n_tri=5)
    V, K = camera()
    frags = rasterize(verts, faces, V, K, W, H)
    fg = frags.mask[0]
    bary = frags.bary[0]
    torch.testing.assert_close(bary[fg].sum(-1), torch.ones(int(fg.sum()), dtype=torch.float64))
    assert (bary[fg] >= -1e-9).all()
    # interpolating camera-space positions and projecting them lands on the pixel centres
    cam = interpolate(verts, frags, faces)[0]
    uv = cam @ K[0].T
    uv = uv[..., :2] / uv[..., 2:]
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    centres = torch.stack([xs, ys], -1) + 0.5
    torch.testing.assert_close(uv[fg], centres[fg])
    torch.testing.assert_close(cam[..., 2][fg], frags.depth[0][fg])


def test_multi_view_matches_single_views(gen):
    verts, faces = random_soup(gen, n_tri=6)
    V, K = camera()
    V2 = V.clone()
    V2[0, 0, 3] = 0.1  # second camera shifted
    Vs, Ks = torch.cat([V, V2]), torch.cat([K, K])
    multi = rasterize(verts, faces, Vs, Ks, W, H)
    for c in range(2):
        single = rasterize(verts, faces, Vs[c : c + 1], Ks[c : c + 1], W, H)
        assert torch.equal(multi.face_ids[c], single.face_ids[0])
    # per-view vertices [C, V, 3]
    per_view = rasterize(verts.expand(2, -1, -1), faces, Vs, Ks, W, H)
    assert torch.equal(per_view.face_ids, multi.face_ids)


def test_faces_crossing_the_near_plane_are_skipped():
    V, K = camera()
    verts = torch.tensor([[-0.5, -0.5, 0.005], [0.5, -0.5, 2.0], [0.0, 0.5, 2.0]], dtype=torch.float64)
    assert not rasterize(verts, torch.tensor([[0, 1, 2]]), V, K, W, H, near=0.01).mask.any()
    assert rasterize(verts, torch.tensor([[0, 1, 2]]), V, K, W, H, near=0.001).mask.any()


def _tiny_mesh():
    verts = torch.tensor(
        [[-0.6, -0.5, 2.0], [0.6, -0.4, 2.2], [0.0, 0.6, 1.8], [0.8, 0.5, 2.5]], dtype=torch.float64
    )
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    return verts, faces


def test_interpolate_gradcheck_attributes_and_positions():
    V, K = camera(f=8.0, w=10, h=8)
    verts, faces = _tiny_mesh()
    attrs = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    frags = rasterize(verts, faces, V, K, 10, 8)
    # pixels well inside their face: the face ids cannot change under gradcheck's perturbations
    inner = frags.mask & (frags.bary.detach().amin(-1) > 0.05)
    assert inner.sum() >= 5

    def f(v, a):
        fr = rasterize(v, faces, V, K, 10, 8)
        assert torch.equal(fr.face_ids, frags.face_ids)
        return interpolate(a, fr, faces)[inner]

    v = verts.clone().requires_grad_(True)
    a = attrs.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (v, a), eps=1e-6, atol=1e-6)
    # the depth output is differentiable too
    assert torch.autograd.gradcheck(lambda v: rasterize(v, faces, V, K, 10, 8).depth[inner], (v,), eps=1e-6, atol=1e-6)


def test_texture_sample_gradcheck_and_convention():
    gen = torch.Generator().manual_seed(3)
    tex = torch.rand(4, 5, 2, dtype=torch.float64, generator=gen)
    uv = 0.1 + 0.8 * torch.rand(2, 3, 3, 2, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(
        lambda t, u: texture_sample(t, u), (tex.requires_grad_(True), uv.requires_grad_(True)), eps=1e-6, atol=1e-6
    )
    # glTF: u = 0 left, v = 0 top row; texel centres at (i + 0.5) / size
    centre = torch.tensor([[[[0.5 / 5, 0.5 / 4], [4.5 / 5, 3.5 / 4]]]], dtype=torch.float64)
    out = texture_sample(tex.detach(), centre)
    torch.testing.assert_close(out[0, 0, 0], tex[0, 0].detach())
    torch.testing.assert_close(out[0, 0, 1], tex[3, 4].detach())
    mask = torch.tensor([[[True, False]]])
    assert (texture_sample(tex.detach(), centre, mask)[0, 0, 1] == 0).all()


def test_silhouette_optimization_moves_triangle_towards_target():
    V, K = camera(f=20.0, w=32, h=32, dtype=torch.float32)
    faces = torch.tensor([[0, 1, 2]])
    start = torch.tensor([[-0.5, -0.4, 2.0], [0.4, -0.3, 2.0], [-0.1, 0.5, 2.0]])
    shift = torch.tensor([0.2, 0.0, 0.0])  # 2 pixels to the right
    target = soft_silhouette(start + shift, faces, V, K, 32, 32).detach()
    verts = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([verts], lr=0.01)
    losses = []
    for step in range(40):
        opt.zero_grad()
        loss = ((soft_silhouette(verts, faces, V, K, 32, 32) - target) ** 2).mean()
        loss.backward()
        if step == 0:
            assert verts.grad.abs().sum() > 0
            assert verts.grad[:, 0].sum() < 0  # descent moves the triangle to the right
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < 0.25 * losses[0]
    moved = (verts.detach() - start)[:, 0]
    assert (moved > 0.05).all()
    assert (verts.detach() - start)[:, 1].abs().max() < 0.1


def test_soft_silhouette_is_hard_mask_away_from_edges():
    V, K = camera()
    verts, faces = _tiny_mesh()
    frags = rasterize(verts, faces, V, K, W, H)
    alpha = soft_silhouette(verts, faces, V, K, W, H, fragments=frags)
    assert alpha.shape == (1, H, W) and ((alpha >= 0) & (alpha <= 1)).all()
    ring = alpha != frags.mask.to(alpha.dtype)
    assert ring.any()
    # changed pixels sit next to a mask change
    m = torch.nn.functional.pad(frags.mask.float()[None], (1, 1, 1, 1), mode="replicate")[0]
    edge = torch.nn.functional.max_pool2d(m, 3, 1) != -torch.nn.functional.max_pool2d(-m, 3, 1)
    assert not (ring[0] & ~edge[0]).any()


def test_render_mesh_outputs():
    V, K = camera(dtype=torch.float32)
    verts, faces = _tiny_mesh()
    verts = verts.float()
    colors = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    out = render_mesh(verts, faces, colors, V, K, W, H, background=(0.0, 0.0, 1.0), shading=False)
    assert out.image.shape == (1, H, W, 3) and out.image.dtype == torch.float32
    assert out.mask.shape == out.alpha.shape == out.depth.shape == out.face_ids.shape == (1, H, W)
    assert out.normals.shape == (1, H, W, 3)
    fg = out.mask[0]
    assert fg.any() and (~fg).any()
    torch.testing.assert_close(out.image[0][fg], colors[0].expand(int(fg.sum()), 3))
    torch.testing.assert_close(out.image[0][~fg], torch.tensor([0.0, 0.0, 1.0]).expand(int((~fg).sum()), 3))
    torch.testing.assert_close(out.normals[0][fg].norm(dim=-1), torch.ones(int(fg.sum())))
    assert (out.depth[0][fg] > 1.7).all() and (out.depth[0][~fg] == 0).all()
    shaded = render_mesh(verts, faces, None, V, K, W, H)
    assert ((shaded.image >= 0) & (shaded.image <= 1)).all()


def test_zero_faces_renders_background():
    V, K = camera(dtype=torch.float32)
    verts = torch.zeros(3, 3)
    faces = torch.zeros(0, 3, dtype=torch.int64)
    out = render_mesh(verts, faces, None, V, K, 8, 6, background=(0.2, 0.3, 0.4))
    assert (out.face_ids == -1).all() and not out.mask.any() and (out.alpha == 0).all()
    torch.testing.assert_close(out.image, torch.tensor([0.2, 0.3, 0.4]).expand(1, 6, 8, 3))
    ids, depth = rasterize_visibility(np.zeros((1, 3, 2)), np.ones((1, 3)), np.zeros((0, 3), np.int64), 8, 6)
    assert (ids == -1).all() and (depth == 0).all()


def test_bad_inputs_raise_clear_errors():
    V, K = camera()
    verts, faces = _tiny_mesh()
    with pytest.raises(ValueError, match=r"vertices must be a \[V, 3\] or \[C, V, 3\].*\(4, 2\)"):
        rasterize(verts[:, :2], faces, V, K, W, H)
    with pytest.raises(ValueError, match=r"faces must be an \[F, 3\]"):
        rasterize(verts, faces[:, :2], V, K, W, H)
    with pytest.raises(ValueError, match=r"faces must index vertices in \[0, 4\), got indices in \[0, 7\]"):
        rasterize(verts, torch.tensor([[0, 1, 7]]), V, K, W, H)
    with pytest.raises(ValueError, match="faces must index"):
        rasterize(verts, torch.tensor([[0, 1, -1]]), V, K, W, H)
    with pytest.raises(ValueError, match="int64"):
        rasterize(verts, faces.float(), V, K, W, H)
    bad = verts.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="vertices must be finite"):
        rasterize(bad, faces, V, K, W, H)
    with pytest.raises(ValueError, match=r"viewmats must be a \[C, 4, 4\]"):
        rasterize(verts, faces, V[0], K, W, H)
    with pytest.raises(ValueError, match=r"Ks must be a \[C, 3, 3\]"):
        rasterize(verts, faces, V, K[:, :2], W, H)
    with pytest.raises(ValueError, match="same C"):
        rasterize(verts, faces, V.expand(2, -1, -1), K, W, H)
    with pytest.raises(ValueError, match="width must be a positive int"):
        rasterize(verts, faces, V, K, 0, H)
    with pytest.raises(ValueError, match="C = 1"):
        rasterize(verts.expand(2, -1, -1), faces, V, K, W, H)
    frags = rasterize(verts, faces, V, K, W, H)
    with pytest.raises(ValueError, match=r"attributes must be a \[V, D\] or \[C, V, D\]"):
        interpolate(torch.zeros(4), frags, faces)
    with pytest.raises(ValueError, match="faces must index"):
        interpolate(torch.zeros(3, 2), frags, faces)
    with pytest.raises(ValueError, match="fragments must be a Fragments"):
        interpolate(torch.zeros(4, 2), frags.face_ids, faces)
    with pytest.raises(ValueError, match=r"uv must be a \[C, H, W, 2\]"):
        texture_sample(torch.zeros(4, 4, 3), torch.zeros(4, 4, 2))
    with pytest.raises(ValueError, match=r"texture must be an \[Ht, Wt, Ch\]"):
        texture_sample(torch.zeros(4, 4), torch.zeros(1, 4, 4, 2))
    with pytest.raises(ValueError, match="sigma_px"):
        soft_silhouette(verts, faces, V, K, W, H, sigma_px=0.0)
    with pytest.raises(ValueError, match="colors must be"):
        render_mesh(verts, faces, torch.zeros(3, 3, dtype=torch.float64), V, K, W, H)
    with pytest.raises(ValueError, match=r"pix must be \[C, V, 2\]"):
        rasterize_visibility(np.zeros((3, 2)), np.zeros((1, 3)), np.zeros((1, 3), np.int64), 4, 4)
    assert isinstance(frags, Fragments)


def test_importing_avatar_does_not_import_numba():
    code = "import sys, avatar, avatar.render.mesh; assert 'numba' not in sys.modules, 'numba imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
