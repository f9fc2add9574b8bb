import math

import pytest
import torch

from avatar.fit import densify as dens
from avatar.represent.avatar import AvatarLR, GaussianAvatar


def grid_avatar(n_side=10, spacing=0.01) -> GaussianAvatar:
    """A flat n x n grid of surface points with 3 bones (no weight field)."""
    xs = torch.arange(n_side, dtype=torch.float32) * spacing
    v = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    v = torch.cat([v, torch.zeros(len(v), 1)], -1)
    idx = torch.arange(n_side * n_side).reshape(n_side, n_side)
    a, b, c, d = idx[:-1, :-1].reshape(-1), idx[1:, :-1].reshape(-1), idx[:-1, 1:].reshape(-1), idx[1:, 1:].reshape(-1)
    faces = torch.cat([torch.stack([a, b, c], 1), torch.stack([b, d, c], 1)])
    w = torch.softmax(torch.randn(len(v), 3, generator=torch.Generator().manual_seed(0)), -1)
    return GaussianAvatar.from_surface(v, faces, w, 0, torch.Generator().manual_seed(1), weight_field=False)


def stepped_optimizer(av):
    opt = torch.optim.Adam(av.param_groups(AvatarLR()), eps=1e-15)
    c = av.canonical()
    (c.means.square().sum() + c.colors.sum() + c.opacities.sum() + c.scales.sum() + c.quats.sum()).backward()
    opt.step()
    return opt


def assert_consistent(av, opt):
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    for name in ("means", "quats", "log_scales", "opacity_logits", "color_logits"):
        p = getattr(av, name)
        assert id(p) in params, name
        st = opt.state[p]
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape, name
    assert len(opt.state) == 5


def test_accumulate_scaling_and_visibility():
    state = dens.init_state(3, torch.zeros(1))
    g = torch.tensor([[[1e-3, 0.0], [0.0, 2e-3], [5.0, 5.0]]])
    radii = torch.tensor([[[1, 1], [2, 2], [0, 0]]], dtype=torch.int32)
    state = dens.accumulate(state, g, radii, width=100, height=50)
    torch.testing.assert_close(state["grad2d"], torch.tensor([1e-3 * 50, 2e-3 * 25, 0.0]))
    torch.testing.assert_close(state["count"], torch.tensor([1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="state has 3"):
        dens.accumulate(state, g[:, :2], radii[:, :2], 100, 50)


def test_clone_small_gaussians_keeps_optimizer_consistent():
    av = grid_avatar()
    opt = stepped_optimizer(av)
    n = av.num_gaussians
    old_avg = opt.state[av.means]["exp_avg"].clone()
    state = dens.init_state(n, av.means.detach())
    state["grad2d"][:5] = 1.0
    state["count"][:5] = 1.0
    cfg = dens.DensifyConfig(grad_threshold=0.1, grow_scale=1.0)  # everything counts as small: clone
    cloned, split = dens.grow(av, opt, state, cfg, torch.Generator().manual_seed(0))
    assert (cloned, split) == (5, 0) and av.num_gaussians == n + 5
    torch.testing.assert_close(av.means[n:], av.means[:5])
    assert_consistent(av, opt)
    torch.testing.assert_close(opt.state[av.means]["exp_avg"][:n], old_avg)
    assert (opt.state[av.means]["exp_avg"][n:] == 0).all()


def test_split_large_gaussians():
    av = grid_avatar()
    opt = stepped_optimizer(av)
    n = av.num_gaussians
    parent_means = av.means[2:4].detach().clone()
    parent_ls = av.log_scales[2:4].detach().clone()
    state = dens.init_state(n, av.means.detach())
    state["grad2d"][2:4] = 1.0
    state["count"][2:4] = 1.0
    cfg = dens.DensifyConfig(grad_threshold=0.1, grow_scale=1e-6)  # everything large: split
    cloned, split = dens.grow(av, opt, state, cfg, torch.Generator().manual_seed(0))
    assert (cloned, split) == (0, 2) and av.num_gaussians == n + 2  # 2 removed, 4 added
    kids = av.means[-4:].detach()
    torch.testing.assert_close(av.log_scales[-4:].detach(), torch.cat([parent_ls, parent_ls]) - math.log(1.6))
    # children lie within a few standard deviations of their parent
    s = parent_ls.exp().max()
    assert ((kids - torch.cat([parent_means, parent_means])).norm(dim=-1) < 5 * s).all()
    assert_consistent(av, opt)
    assert (opt.state[av.means]["exp_avg"][-4:] == 0).all()


def test_growth_respects_budget():
    av = grid_avatar()
    n = av.num_gaussians
    state = dens.init_state(n, av.means.detach())
    state["grad2d"][:] = torch.arange(n, dtype=torch.float32)
    state["count"][:] = 1.0
    cfg = dens.DensifyConfig(grad_threshold=0.5, grow_scale=1.0, max_gaussians=n + 7)
    cloned, _ = dens.grow(av, None, state, cfg, torch.Generator().manual_seed(0))
    assert cloned == 7 and av.num_gaussians == n + 7
    # the highest gradients grew
    torch.testing.assert_close(av.means[n:], av.means[n - 7:n])


def test_prune_transparent_and_off_body():
    av = grid_avatar()
    opt = stepped_optimizer(av)
    n = av.num_gaussians
    with torch.no_grad():
        av.opacity_logits[:3] = -10.0  # transparent
        av.means[10:12] += torch.tensor([0.0, 0.0, 0.2])  # 20 cm off the surface
    kept_avg = opt.state[av.means]["exp_avg"][12:].clone()
    pruned = dens.prune(av, opt, dens.DensifyConfig())
    assert pruned == 5 and av.num_gaussians == n - 5
    assert_consistent(av, opt)
    torch.testing.assert_close(opt.state[av.means]["exp_avg"][7:], kept_avg)


def test_reset_opacity_and_refine_schedule():
    av = grid_avatar()
    opt = stepped_optimizer(av)
    dens.reset_opacity(av, opt, 0.01)
    assert float(torch.sigmoid(av.opacity_logits.detach()).max()) <= 0.01 + 1e-6
    assert (opt.state[av.opacity_logits]["exp_avg"] == 0).all()
    state = dens.init_state(av.num_gaussians, av.means.detach())
    cfg = dens.DensifyConfig(start=10, stop=30, interval=10)
    _, rep = dens.refine(5, av, opt, state, cfg, torch.Generator())
    assert rep is None
    state["grad2d"][:] = 1.0
    state["count"][:] = 1.0
    new_state, rep = dens.refine(10, av, opt, state, dens.DensifyConfig(start=10, stop=30, interval=10,
                                                                         grow_scale=1.0, prune_opacity=1e-9), torch.Generator())
    assert rep is not None and rep.cloned == 100 and rep.num_gaussians == 200
    assert new_state["grad2d"].shape == (200,) and float(new_state["grad2d"].sum()) == 0.0
    assert_consistent(av, opt)
    with pytest.raises(ValueError, match="split_factor"):
        dens.DensifyConfig(split_factor=1.0).validate()
