"""Front and back depth layers of a mesh seen from one camera, and their back-projection to world points.

CanonicalFusion's network sees and predicts two depth maps per view: the first surface along each pixel's ray
(``depth_front``) and the last one (``depth_back``), so one image gives a closed "sandwich" of the body. Both layers
come from the project's mesh rasterizer (``avatar.render.mesh``):

- front: ``rasterize`` as is (nearest face wins the z-buffer).
- back: the same compiled visibility pass with the depth test reversed by re-mapping each vertex's camera depth
  ``z`` to ``z' = 1 / (c - 1/z)`` with ``c = 2 / z_min`` (``z_min`` the smallest vertex depth of the faces kept).
  The kernel interpolates ``1/z'`` linearly in screen space, which is ``c - (interpolated 1/z)``, and keeps the
  smallest ``z'``, i.e. the smallest ``c - 1/z``, i.e. the *largest* true depth. ``c > 1/z`` for every kept vertex, so
  ``z'`` stays positive and finite (it lies in ``(z_min/2, z_min]``). Faces with a vertex nearer than ``near`` are
  dropped first (the rasterizer's own rule, applied to the true depth). The kernel then only decides which face is
  farthest; the barycentrics and depth of that face at the pixel centre are re-computed from the true projected
  vertices exactly as for the front layer.

Conventions: ``avatar.geometry`` / ARCHITECTURE.md (OpenCV camera, world-to-camera ``viewmat``, pixel centres at
``i + 0.5``); depths are camera z in metres, 0 where no face covers the pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from avatar.geometry.projection import project_points
from avatar.render.mesh import _barycentrics, rasterize, rasterize_visibility

__all__ = ["DepthLayers", "render_depth_layers", "backproject", "pixel_rays"]


@dataclass(frozen=True)
class DepthLayers:
    """Two depth layers of one view.

    mask:        [H, W] bool, a face covers the pixel centre.
    depth_front: [H, W] camera z (metres) of the first surface, 0 where not covered.
    depth_back:  [H, W] camera z of the last surface, 0 where not covered (equal to the front where one face covers).
    attrs_front: [H, W, C] vertex attributes interpolated at the first surface (0 outside), or None.
    attrs_back:  [H, W, C] ... at the last surface, or None.
    """

    mask: Tensor
    depth_front: Tensor
    depth_back: Tensor
    attrs_front: Tensor | None = None
    attrs_back: Tensor | None = None


def _check_view(name: str, viewmat: Tensor, K: Tensor) -> None:
    if not isinstance(viewmat, Tensor) or viewmat.shape != (4, 4):
        raise ValueError(f"{name}: viewmat must be a [4, 4] world-to-camera tensor, got {_shape(viewmat)}")
    if not isinstance(K, Tensor) or K.shape != (3, 3):
        raise ValueError(f"{name}: K must be a [3, 3] intrinsics tensor, got {_shape(K)}")


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _interp(attrs: Tensor, faces: Tensor, face_ids: Tensor, bary: Tensor) -> Tensor:
    """attrs [V, C], faces [F, 3], face_ids [H, W] (-1 background), bary [H, W, 3] -> [H, W, C] (0 outside)."""
    tri = faces[face_ids.clamp(min=0)]  # [H, W, 3]
    out = (bary[..., None].to(attrs.dtype) * attrs[tri]).sum(-2)
    return torch.where((face_ids >= 0)[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def render_depth_layers(
    vertices: Tensor,  # [V, 3] world positions
    faces: Tensor,  # [F, 3] int64
    viewmat: Tensor,  # [4, 4] world-to-camera
    K: Tensor,  # [3, 3] pixel intrinsics
    width: int,
    height: int,
    vertex_attrs: Tensor | None = None,  # [V, C] e.g. skinning codes
    near: float = 0.01,
) -> DepthLayers:
    """Front and back depth layers (and optionally interpolated attributes) of a mesh from one camera.

    Depths are differentiable w.r.t. ``vertices`` like ``avatar.render.mesh.rasterize``; which face is first / last
    is not. See the module docstring for how the back layer reverses the depth test.
    """
    _check_view("render_depth_layers", viewmat, K)
    if not isinstance(vertices, Tensor) or vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"render_depth_layers: vertices must be a [V, 3] tensor, got {_shape(vertices)}")
    if vertex_attrs is not None and (not isinstance(vertex_attrs, Tensor) or vertex_attrs.ndim != 2
                                     or vertex_attrs.shape[0] != vertices.shape[0]):
        raise ValueError(f"render_depth_layers: vertex_attrs must be [V, C] with V = {vertices.shape[0]}, "
                         f"got {_shape(vertex_attrs)}")
    vm, Kb = viewmat[None].to(vertices.dtype), K[None].to(vertices.dtype)
    front = rasterize(vertices, faces, vm, Kb, width, height, near=near)  # checks faces, size, finiteness
    faces = faces.to(torch.int64)
    pix, z = project_points(vertices[None], vm, Kb)  # [1, V, 2], [1, V]
    # reversed depth test: drop faces crossing the near plane, then re-map z so the kernel's "nearest" is the farthest
    keep = (z[0, faces] >= near).all(-1)
    kept = torch.nonzero(keep).squeeze(-1)
    back_ids = torch.full_like(front.face_ids, -1)
    if kept.numel():
        zd = z.detach().double()
        used = torch.unique(faces[kept])
        c = 2.0 / float(zd[0, used].min())
        zr = 1.0 / (c - 1.0 / zd.clamp(min=near))  # [1, V]; only vertices of kept faces matter
        ids, _ = rasterize_visibility(pix.detach().cpu().double().numpy(), zr.cpu().numpy(),
                                      faces[kept].cpu().numpy(), width, height, near=1e-12)
        ids_t = torch.from_numpy(ids).to(faces.device)
        back_ids = torch.where(ids_t >= 0, kept[ids_t.clamp(min=0)], back_ids)
    bary_b, depth_b = _barycentrics(pix, z, faces, back_ids)
    mask = front.mask[0]
    attrs_front = attrs_back = None
    if vertex_attrs is not None:
        attrs_front = _interp(vertex_attrs, faces, front.face_ids[0], front.bary[0])
        attrs_back = _interp(vertex_attrs, faces, back_ids[0], bary_b[0])
    return DepthLayers(mask=mask, depth_front=front.depth[0], depth_back=depth_b[0], attrs_front=attrs_front,
                       attrs_back=attrs_back)


def pixel_rays(K: Tensor, height: int, width: int) -> Tensor:
    """Camera-space directions ``[H, W, 3]`` with z = 1 through the pixel centres ``(i + 0.5, j + 0.5)``."""
    dtype = K.dtype if K.is_floating_point() else torch.float32
    yy, xx = torch.meshgrid(torch.arange(height, dtype=dtype, device=K.device) + 0.5,
                            torch.arange(width, dtype=dtype, device=K.device) + 0.5, indexing="ij")
    x = (xx - K[0, 2] - K[0, 1] * (yy - K[1, 2]) / K[1, 1]) / K[0, 0]
    y = (yy - K[1, 2]) / K[1, 1]
    return torch.stack([x, y, torch.ones_like(x)], -1)


def backproject(depth: Tensor, K: Tensor, viewmat: Tensor) -> Tensor:
    """World points ``[H, W, 3]`` of a depth map ``depth [H, W]`` (camera z, metres) seen by ``K [3, 3]`` and
    world-to-camera ``viewmat [4, 4]``: the inverse of projecting with ``avatar.geometry.project_points``. Pixels with
    depth 0 map to the camera centre; select the valid ones with the layer's mask."""
    _check_view("backproject", viewmat, K)
    if not isinstance(depth, Tensor) or depth.ndim != 2 or not depth.is_floating_point():
        raise ValueError(f"backproject: depth must be a float [H, W] tensor, got {_shape(depth)}")
    K = K.to(depth.dtype)
    vm = viewmat.to(depth.dtype)
    cam = pixel_rays(K, depth.shape[0], depth.shape[1]) * depth[..., None]  # [H, W, 3]
    R, t = vm[:3, :3], vm[:3, 3]
    return (cam - t) @ R  # R^T (x - t), row vectors
