"""Renderers: the differentiable mesh rasterizer (compiled CPU visibility + torch interpolation), the Gaussian
rasterizer (to come: gsplat on CUDA, compiled CPU, torch reference) and a non-differentiable preview.

Importing this package compiles nothing: numba kernels are built (or loaded from the on-disk cache) on first call.
"""

from avatar.render.mesh import (
    Fragments,
    MeshRenderOutput,
    interpolate,
    rasterize,
    rasterize_visibility,
    render_mesh,
    soft_silhouette,
    texture_sample,
    vertex_normals,
)
from avatar.render.preview import render_mesh_preview

__all__ = [
    "Fragments",
    "MeshRenderOutput",
    "interpolate",
    "rasterize",
    "rasterize_visibility",
    "render_mesh",
    "soft_silhouette",
    "texture_sample",
    "vertex_normals",
    "render_mesh_preview",
]
