"""A quick, non-differentiable mesh preview: flat Lambert shading drawn back to front (painter's algorithm) with
Pillow. For looking at a body or a result; nothing learns through it. Pillow draws the polygons; the rest is
projection and sorting.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from avatar.geometry.projection import project_points


def render_mesh_preview(
    vertices: Tensor,
    faces: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    color: tuple[float, float, float] = (0.82, 0.68, 0.58),
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Render ``vertices [V, 3]`` / ``faces [F, 3]`` seen by one camera (``viewmat [4, 4]``, ``K [3, 3]``).

    Returns an ``[H, W, 3]`` uint8 image. Faces behind the camera or turned away from it are skipped; the light
    comes from the camera.
    """
    if vertices.ndim != 2 or vertices.shape[-1] != 3:
        raise ValueError(f"render_mesh_preview: vertices must be [V, 3], got {tuple(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"render_mesh_preview: faces must be [F, 3], got {tuple(faces.shape)}")
    with torch.no_grad():
        v = vertices.detach().to(torch.float64).cpu()
        Vm = viewmat.detach().to(torch.float64).cpu()
        uv, depth = project_points(v, Vm, K.detach().to(torch.float64).cpu())
        cam = v @ Vm[:3, :3].T + Vm[:3, 3]
    f = faces.cpu().numpy()
    cam = cam.numpy()
    uv = uv.numpy()
    depth = depth.numpy()
    tri = cam[f]  # [F, 3, 3]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True) + 1e-12
    centers = tri.mean(1)
    view = -centers / (np.linalg.norm(centers, axis=-1, keepdims=True) + 1e-12)
    facing = (normals * view).sum(-1)
    visible = (depth[f].min(1) > 1e-3) & (facing > 0)
    order = np.argsort(-centers[:, 2])
    order = order[visible[order]]
    shade = 0.25 + 0.75 * facing
    img = Image.new("RGB", (width, height), tuple(int(255 * c) for c in background))
    draw = ImageDraw.Draw(img)
    base = np.asarray(color)
    for i in order:
        c = tuple(int(x) for x in np.clip(255 * base * shade[i], 0, 255))
        draw.polygon([tuple(p) for p in uv[f[i]].tolist()], fill=c)
    return np.asarray(img)
