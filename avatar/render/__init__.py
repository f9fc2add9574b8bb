"""Renderers. For now a non-differentiable preview of meshes; the differentiable Gaussian and mesh rasterizers
(gsplat on CUDA, a compiled CPU backend, a torch reference) arrive with the rasterizer issue."""

from avatar.render.preview import render_mesh_preview

__all__ = ["render_mesh_preview"]
