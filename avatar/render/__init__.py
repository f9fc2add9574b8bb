"""Renderers: 3D Gaussian splatting (``rasterize_gaussians``: gsplat on CUDA, a compiled CPU backend, a torch
reference), the differentiable mesh rasterizer (compiled CPU visibility + torch interpolation) and a
non-differentiable preview.

Importing this package compiles nothing: numba kernels are built (or loaded from the on-disk cache) on first call.
"""

from avatar.render.gaussians import GaussianRender, rasterize_gaussians, render_gaussian_set
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
    "GaussianRender",
    "rasterize_gaussians",
    "render_gaussian_set",
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
