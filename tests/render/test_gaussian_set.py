import pytest
import torch

from avatar.geometry import intrinsics_from_fov, look_at
from avatar.render import rasterize_gaussians, render_gaussian_set
from avatar.types import Cameras, GaussianSet


def test_render_gaussian_set_matches_rasterize(gen):
    n = 200
    gs = GaussianSet(
        means=0.2 * torch.randn(n, 3, generator=gen), quats=torch.randn(n, 4, generator=gen),
        scales=0.02 + 0.02 * torch.rand(n, 3, generator=gen), opacities=torch.rand(n, generator=gen),
        colors=torch.rand(n, 3, generator=gen),
    )
    vm = look_at(torch.tensor([0.0, 0.0, -2.0]), torch.zeros(3), torch.tensor([0.0, -1.0, 0.0]))
    K = intrinsics_from_fov(50.0, 48, 40)
    cams = Cameras(vm, K, 48, 40)
    a = render_gaussian_set(gs, cams, backend="torch")
    b = rasterize_gaussians(gs.means, gs.quats, gs.scales, gs.opacities, gs.colors, vm[None], K[None], 48, 40,
                            backend="torch")
    torch.testing.assert_close(a.colors, b.colors)
    assert a.alphas.max() > 0.3
    with pytest.raises(ValueError, match="GaussianSet.scales"):
        GaussianSet(gs.means, gs.quats, gs.scales[:5], gs.opacities, gs.colors)
