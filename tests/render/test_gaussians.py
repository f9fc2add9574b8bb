"""Gaussian rasterization: the numba CPU backend against the torch reference (images and gradients), the projection
against gsplat's torch implementation (when gsplat is installed), gsplat on CUDA (when available), degenerate input."""

from __future__ import annotations

import logging
import math
import subprocess
import sys

import pytest
import torch

from avatar.render.gaussians import rasterize_gaussians


def make_scene(n=300, width=64, height=48, cameras=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * torch.tensor([0.4, 0.3, 0.3])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.08 + 0.01
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    colors = torch.rand(n, 3, generator=g)
    viewmats = []
    for c in range(cameras):
        a = 0.3 * c
        vm = torch.eye(4)
        vm[:3, :3] = torch.tensor([[math.cos(a), 0, -math.sin(a)], [0, 1, 0], [math.sin(a), 0, math.cos(a)]])
        vm[:3, 3] = torch.tensor([0.05 * c, 0.0, 2.5])
        viewmats.append(vm)
    Ks = torch.tensor([[60.0, 0, width / 2 + 1], [0, 60.0, height / 2 - 2], [0, 0, 1]]).expand(cameras, 3, 3).clone()
    return dict(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors,
                viewmats=torch.stack(viewmats), Ks=Ks, width=width, height=height)


@pytest.fixture(scope="session")
def cpu_backend():
    """Compile (or load from numba's cache) the CPU kernels once per session, forward and backward."""
    s = make_scene(n=20, width=20, height=20, cameras=1)
    means = s["means"].clone().requires_grad_(True)
    r = rasterize_gaussians(**{**s, "means": means}, backend="cpu")
    (r.colors.sum() + r.alphas.sum() + r.depths.sum()).backward()
    return "cpu"


def render_with_grads(scene, backend, background):
    leaves = {k: scene[k].clone().requires_grad_(True) for k in ("means", "quats", "scales", "opacities", "colors")}
    bg = background.clone().requires_grad_(True)
    r = rasterize_gaussians(**{**scene, **leaves}, background=bg, backend=backend)
    r.means2d.retain_grad()
    g = torch.Generator().manual_seed(7)
    loss = ((r.colors * torch.randn(r.colors.shape, generator=g)).sum()
            + (r.alphas * torch.randn(r.alphas.shape, generator=g)).sum()
            + (r.depths * torch.randn(r.depths.shape, generator=g)).sum())
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items()}
    grads["background"] = bg.grad
    grads["means2d"] = r.means2d.grad
    return r, grads


@pytest.mark.parametrize("seed,lanes", [(0, False), (1, False), (0, True), (1, True)])
def test_cpu_matches_torch_reference(cpu_backend, seed, lanes, monkeypatch):
    """Both CPU kernel families: per-pixel (any channel count) and 8-lane vectorized (RGB + depth)."""
    from avatar.render import gaussians_cpu

    monkeypatch.setattr(gaussians_cpu, "LANE_KERNELS", lanes)
    scene = make_scene(seed=seed)
    bg = torch.tensor([0.1, 0.2, 0.3])
    ref, g_ref = render_with_grads(scene, "torch", bg)
    cpu, g_cpu = render_with_grads(scene, cpu_backend, bg)
    assert cpu.colors.shape == (2, 48, 64, 3) and cpu.alphas.shape == (2, 48, 64) and cpu.depths.shape == (2, 48, 64)
    assert cpu.means2d.shape == (2, 300, 2)
    assert ref.alphas.max() > 0.5  # the scene is visible
    for name in ("colors", "alphas", "depths"):
        diff = (getattr(cpu, name) - getattr(ref, name)).abs()
        assert diff.mean() < 1e-4 and diff.max() < 2e-2, name
    assert torch.equal(cpu.radii, ref.radii)
    for name, g in g_ref.items():
        assert g is not None and g_cpu[name] is not None, name
        rel = (g_cpu[name] - g).norm() / g.norm()
        assert rel < 1e-2, f"{name}: relative gradient error {rel:.2e}"


@pytest.mark.parametrize("lanes", [False, True])
def test_cpu_matches_torch_on_saturated_partial_tiles(cpu_backend, lanes, monkeypatch):
    """A dense, nearly opaque scene on an image whose size is no multiple of the 16x16 tile: many pixels reach the
    transmittance floor (gsplat's early stop, the lane kernels' finished-lane bookkeeping) and the right and bottom
    tiles are partial. Both kernel families against the reference, values and gradients."""
    from avatar.render import gaussians_cpu

    monkeypatch.setattr(gaussians_cpu, "LANE_KERNELS", lanes)
    scene = make_scene(n=1500, width=70, height=45, seed=6)
    scene["opacities"] = 0.9 + 0.09 * torch.rand(1500, generator=torch.Generator().manual_seed(2))
    scene["means"] = scene["means"] * 0.6
    scene["scales"] = scene["scales"] * 3.0
    bg = torch.tensor([0.3, 0.1, 0.2])
    ref, g_ref = render_with_grads(scene, "torch", bg)
    cpu, g_cpu = render_with_grads(scene, cpu_backend, bg)
    assert (ref.alphas > 1 - 3e-4).float().mean() > 0.2  # many pixels stopped near the transmittance floor 1e-4
    for name in ("colors", "alphas", "depths"):
        diff = (getattr(cpu, name) - getattr(ref, name)).abs()
        assert diff.mean() < 1e-4 and diff.max() < 2e-2, name
    for name, g in g_ref.items():
        rel = (g_cpu[name] - g).norm() / g.norm()
        assert rel < 1e-2, f"{name}: relative gradient error {rel:.2e}"


def test_cpu_no_grad_render_matches(cpu_backend):
    """A render under ``torch.no_grad`` (binning without the gradient slots) gives the images of a render that records
    the graph, bit for bit."""
    s = make_scene(seed=8)
    bg = torch.tensor([0.1, 0.2, 0.3])
    with torch.no_grad():
        plain = rasterize_gaussians(**s, background=bg, backend="cpu")
    means = s["means"].clone().requires_grad_(True)
    graph = rasterize_gaussians(**{**s, "means": means}, background=bg, backend="cpu")
    assert graph.colors.requires_grad and not plain.colors.requires_grad
    for name in ("colors", "alphas", "depths"):
        assert torch.equal(getattr(plain, name), getattr(graph, name).detach()), name


def test_projection_matches_gsplat_torch_impl(cpu_backend):
    impl = pytest.importorskip("gsplat.cuda._torch_impl")
    from avatar.render import gaussians_cpu, gaussians_torch

    s = make_scene(n=200, seed=3)
    opac = torch.ones(200)  # full opacity: our opacity-aware box is then gsplat's 3.33-sigma box (up to rounding)
    covars, _ = impl._quat_scale_to_covar_preci(s["quats"], s["scales"], compute_preci=False)
    radii_g, m2d_g, depth_g, conics_g, _ = impl._fully_fused_projection(
        s["means"], covars, s["viewmats"], s["Ks"], s["width"], s["height"], eps2d=0.3)
    valid = (radii_g > 0).all(-1)
    assert valid.sum() > 100
    for mod in (gaussians_torch, gaussians_cpu):
        m2d, conics, depths, radii = mod.project_gaussians(s["means"], s["quats"], s["scales"], opac, s["viewmats"],
                                                           s["Ks"], s["width"], s["height"])[:4]
        ours = (radii > 0).any(-1)
        assert torch.equal(ours, valid), mod.__name__
        torch.testing.assert_close(m2d[valid], m2d_g[valid], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(depths[valid], depth_g[valid], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(conics[valid], conics_g[valid], rtol=1e-4, atol=1e-5)
        assert (radii[valid] - radii_g[valid]).abs().max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gsplat_cuda_matches_cpu(cpu_backend):
    pytest.importorskip("gsplat")
    s = make_scene(seed=4)
    bg = torch.tensor([0.1, 0.2, 0.3])
    cpu = rasterize_gaussians(**s, background=bg, backend="cpu")
    cuda = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in s.items()}
    gs = rasterize_gaussians(**cuda, background=bg.cuda(), backend="auto")
    for name in ("colors", "alphas", "depths"):
        diff = (getattr(gs, name).cpu() - getattr(cpu, name)).abs()
        assert diff.mean() < 1e-3 and diff.max() < 5e-2, name


def test_zero_gaussians_gives_background(cpu_backend):
    s = make_scene(n=0)
    bg = torch.tensor([0.2, 0.4, 0.6])
    for backend in ("cpu", "torch"):
        r = rasterize_gaussians(**s, background=bg, backend=backend)
        assert torch.allclose(r.colors, bg.expand(2, 48, 64, 3))
        assert r.alphas.abs().max() == 0 and r.depths.abs().max() == 0
        assert r.means2d.shape == (2, 0, 2)


def test_all_behind_camera(cpu_backend):
    s = make_scene(n=50)
    s["means"] = s["means"] - torch.tensor([0.0, 0.0, 10.0])  # z = 2.5 - 10 < 0 in both cameras
    bg = torch.tensor([0.2, 0.4, 0.6])
    means = s["means"].clone().requires_grad_(True)
    r = rasterize_gaussians(**{**s, "means": means}, background=bg, backend="cpu")
    assert torch.allclose(r.colors, bg.expand(2, 48, 64, 3)) and r.alphas.abs().max() == 0
    assert (r.radii == 0).all()
    r.colors.sum().backward()
    assert torch.isfinite(means.grad).all() and means.grad.abs().max() == 0


@pytest.mark.parametrize("field", ["means", "quats", "scales", "opacities", "colors", "viewmats"])
def test_nan_input_raises(field):
    s = make_scene(n=10)
    s[field] = s[field].clone()
    s[field].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rasterize_gaussians(**s, backend="cpu")


def test_bad_shapes_and_backend_raise():
    s = make_scene(n=10)
    with pytest.raises(ValueError, match="quats"):
        rasterize_gaussians(**{**s, "quats": s["quats"][:, :3]})
    with pytest.raises(ValueError, match="background"):
        rasterize_gaussians(**s, background=torch.zeros(4))
    with pytest.raises(ValueError, match="backend"):
        rasterize_gaussians(**s, backend="opengl")
    with pytest.raises(ValueError, match="CUDA"):
        rasterize_gaussians(**s, backend="gsplat")


def test_huge_scales_are_finite(cpu_backend):
    s = make_scene(n=20)
    s["scales"] = torch.full((20, 3), 1e3)
    scales = s["scales"].clone().requires_grad_(True)
    r = rasterize_gaussians(**{**s, "scales": scales}, background=torch.ones(3), backend="cpu")
    for t in (r.colors, r.alphas, r.depths):
        assert torch.isfinite(t).all()
    (r.colors.sum() + r.depths.sum()).backward()
    assert torch.isfinite(scales.grad).all()


def test_auto_picks_cpu_and_logs(cpu_backend, caplog):
    s = make_scene(n=30)
    with caplog.at_level(logging.INFO, logger="avatar.render.gaussians"):
        auto = rasterize_gaussians(**s, backend="auto")
    cpu = rasterize_gaussians(**s, backend="cpu")
    assert torch.equal(auto.colors, cpu.colors)
    from avatar.render import gaussians

    assert "picked 'cpu'" in caplog.text or any("picked 'cpu'" in m for m in gaussians._LOGGED)


def test_import_compiles_nothing():
    code = "import sys, avatar, avatar.render.gaussians; assert 'numba' not in sys.modules, 'numba imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_rasterize_projected_matches_torch(cpu_backend):
    """The lower-level contract (projected Gaussians, K generic channels, no background) against the reference."""
    from avatar.render import gaussians_cpu, gaussians_torch

    s = make_scene(n=120, seed=5)
    C, N = 2, 120
    proj = gaussians_torch.project_gaussians(s["means"], s["quats"], s["scales"], s["opacities"], s["viewmats"],
                                             s["Ks"], s["width"], s["height"])
    means2d, conics, depths, radii = (t.detach() for t in proj[:4])
    feats = torch.rand(C, N, 2, generator=torch.Generator().manual_seed(1))
    opac = s["opacities"].expand(C, N)
    outs, grads = [], []
    for mod in (gaussians_torch, gaussians_cpu):
        leaves = [t.clone().requires_grad_(True) for t in (means2d, conics, opac, feats)]
        out, alphas = mod.rasterize_projected(*leaves[:3], leaves[3], radii, depths, s["width"], s["height"])
        assert out.shape == (C, 48, 64, 2) and alphas.shape == (C, 48, 64)
        (out * torch.linspace(-1, 1, 64)[:, None]).sum().backward()
        outs.append((out.detach(), alphas.detach()))
        grads.append([t.grad for t in leaves])
    for a, b in zip(*outs):
        assert (a - b).abs().max() < 2e-3 and (a - b).abs().mean() < 1e-5
    for ga, gb in zip(*grads):
        assert (gb - ga).norm() / ga.norm() < 1e-2


def test_cpu_keeps_float64(cpu_backend):
    """float64 inputs give float64 images and gradients (the kernels run in float32 inside)."""
    s = {k: (v.double() if torch.is_tensor(v) else v) for k, v in make_scene(n=40, seed=2).items()}
    colors = s["colors"].clone().requires_grad_(True)
    bg = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64, requires_grad=True)
    r = rasterize_gaussians(**{**s, "colors": colors}, background=bg, backend="cpu")
    assert r.colors.dtype == r.alphas.dtype == r.depths.dtype == torch.float64
    (r.colors.sum() + r.depths.sum()).backward()
    assert colors.grad.dtype == bg.grad.dtype == torch.float64
    # d sum(colors) / d bg_k = sum over pixels of the final transmittance = sum(1 - alphas)
    torch.testing.assert_close(bg.grad, (1 - r.alphas).sum().expand(3), rtol=1e-5, atol=1e-3)
