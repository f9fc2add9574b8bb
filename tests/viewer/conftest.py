"""Tiny avatar bundles on the anny body for the viewer tests (made with save_bundle, no fitting)."""

import pytest
import torch

from avatar.export.bundle import save_bundle
from avatar.represent.avatar import sample_surface
from avatar.types import GaussianSet


def make_gaussians(body, n: int, seed: int = 0, dense_noise: float = 0.1) -> GaussianSet:
    """``n`` Gaussians on anny's rest surface: barycentric skin weights passed through a residual softmax (so every
    bone keeps ~1e-9, as a fitted weight field leaves them), random rotations, 2-12 mm scales, random colours."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rest = body.rest()
        s = sample_surface(rest.vertices[0], body.faces, n, g)
        w = (body.dense_skin_weights()[body.faces[s.face_ids]] * s.bary[..., None]).sum(1)
        w = torch.softmax(torch.log(w + 1e-9) + dense_noise * torch.randn(w.shape, generator=g), dim=-1)
    return GaussianSet(s.points.float(), torch.randn(n, 4, generator=g), torch.rand(n, 3, generator=g) * 0.01 + 0.002,
                       torch.rand(n, generator=g) * 0.8 + 0.2, torch.rand(n, 3, generator=g), w.float())


def write_bundle(path, body, n: int = 3000, seed: int = 0):
    return save_bundle(path, make_gaussians(body, n, seed), body.name, body.bone_names, body.bone_parents,
                       body.default_shape().float(), {"test": True}, shape_names=body.shape_names)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, anny_body):
    return write_bundle(tmp_path_factory.mktemp("viewer") / "avatar", anny_body)
