import numpy as np
import pytest
import torch

from avatar.geometry import intrinsics_from_fov, look_at
from avatar.render import render_mesh_preview


def camera():
    V = look_at(torch.tensor([0.0, 0.0, -2.0]), torch.zeros(3), torch.tensor([0.0, -1.0, 0.0]))
    return V, intrinsics_from_fov(60.0, 64, 64)


def test_front_facing_triangle_is_drawn_where_projected():
    V, K = camera()
    verts = torch.tensor([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.5, 0.0]])
    img_a = render_mesh_preview(verts, torch.tensor([[0, 1, 2]]), V, K, 64, 64)
    img_b = render_mesh_preview(verts, torch.tensor([[0, 2, 1]]), V, K, 64, 64)
    drawn_a = (img_a < 250).any(-1)
    drawn_b = (img_b < 250).any(-1)
    # exactly one winding faces the camera; the other is culled
    assert drawn_a.sum() + drawn_b.sum() > 100 and min(drawn_a.sum(), drawn_b.sum()) == 0
    drawn = drawn_a if drawn_a.sum() else drawn_b
    assert drawn[32, 32]  # the centre of the triangle is at the image centre
    assert not drawn[2, 2]


def test_bad_shapes():
    V, K = camera()
    with pytest.raises(ValueError, match="vertices"):
        render_mesh_preview(torch.zeros(3, 2), torch.zeros(1, 3, dtype=torch.long), V, K, 8, 8)
