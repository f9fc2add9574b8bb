"""A differentiable triangle-mesh rasterizer for the CPU, in the style of nvdiffrast.

Why hand-written: pytorch3d is not installable here and nvdiffrast needs CUDA. The design follows nvdiffrast's
split into a non-differentiable visibility pass and differentiable pieces around it:

1. ``rasterize_visibility`` (numpy in, numpy out) is a compiled numba kernel: per-triangle bounding boxes binned
   into bands of image rows, edge functions with a top-left style tie rule (each pixel centre lying exactly on a
   shared edge belongs to exactly one of the two triangles), a z-buffer on camera depth (ties go to the lower face
   id), parallel over row bands. numba is imported lazily, on the first call, so ``import avatar`` never compiles.
2. ``rasterize`` projects the vertices in torch, runs the visibility pass on a detached copy and then re-computes
   the perspective-correct barycentrics and depth of each covered pixel in torch from the projected positions of
   its face, so ``Fragments.bary`` and ``Fragments.depth`` carry gradients to the vertex positions (like
   nvdiffrast's ``rasterize`` output). The face ids themselves are piecewise constant: no gradient.
3. ``interpolate`` blends vertex attributes with those barycentrics; ``texture_sample`` samples a texture
   bilinearly (``grid_sample``); ``soft_silhouette`` gives the silhouette gradients at the foreground/background
   boundary that visibility alone cannot, and ``render_mesh`` composes them.

Conventions: OpenCV cameras (x right, y down, z forward), ``viewmats [C, 4, 4]`` world-to-camera, ``Ks [C, 3, 3]``
pixel intrinsics, pixel ``(row j, column i)`` has its centre at ``(x, y) = (i + 0.5, j + 0.5)``. Triangles with a
vertex closer than ``near`` (camera z) are skipped entirely, not clipped: a mesh that crosses the near plane loses
those faces. There is no back-face culling; the z-buffer resolves which side is seen.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F_
from torch import Tensor

from avatar.geometry.projection import project_points

__all__ = [
    "Fragments",
    "MeshRenderOutput",
    "rasterize_visibility",
    "rasterize",
    "interpolate",
    "texture_sample",
    "soft_silhouette",
    "vertex_normals",
    "render_mesh",
]

_BAND_ROWS = 8  # image rows per parallel work item of the visibility kernel


@dataclass(frozen=True)
class Fragments:
    """What the rasterizer found at each pixel.

    face_ids: [C, H, W] int64, index of the visible face, -1 for background.
    bary:     [C, H, W, 3] perspective-correct barycentrics of the visible face (vertex order of ``faces``), 0 for
              background; dtype of the vertices (float32 normally); differentiable w.r.t. vertex positions.
    depth:    [C, H, W] camera z of the visible surface, 0 for background; differentiable like ``bary``.
    """

    face_ids: Tensor
    bary: Tensor
    depth: Tensor

    @property
    def mask(self) -> Tensor:
        """[C, H, W] bool, True where a face covers the pixel centre."""
        return self.face_ids >= 0


@dataclass(frozen=True)
class MeshRenderOutput:
    """image [C, H, W, 3] in [0, 1]; mask [C, H, W] bool (hard coverage); alpha [C, H, W] soft silhouette with
    edge gradients; depth [C, H, W] camera z (0 = background); normals [C, H, W, 3] unit camera-space normals
    (0 = background); face_ids [C, H, W] int64 (-1 = background)."""

    image: Tensor
    mask: Tensor
    alpha: Tensor
    depth: Tensor
    normals: Tensor
    face_ids: Tensor


# ----------------------------------------------------------------------------------------------------------------
# input checks


def _check_cameras(name: str, viewmats: Tensor, Ks: Tensor) -> int:
    if not isinstance(viewmats, Tensor) or viewmats.ndim != 3 or viewmats.shape[1:] != (4, 4):
        raise ValueError(f"{name}: viewmats must be a [C, 4, 4] tensor, got {_shape(viewmats)}")
    if not isinstance(Ks, Tensor) or Ks.ndim != 3 or Ks.shape[1:] != (3, 3):
        raise ValueError(f"{name}: Ks must be a [C, 3, 3] tensor, got {_shape(Ks)}")
    if Ks.shape[0] != viewmats.shape[0]:
        raise ValueError(f"{name}: viewmats and Ks must have the same C, got {viewmats.shape[0]} and {Ks.shape[0]}")
    if not (torch.isfinite(viewmats).all() and torch.isfinite(Ks).all()):
        raise ValueError(f"{name}: viewmats and Ks must be finite, got NaN or inf")
    return viewmats.shape[0]


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, (Tensor, np.ndarray)) else type(x).__name__


def _check_size(name: str, width, height) -> None:
    for label, n in (("width", width), ("height", height)):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"{name}: {label} must be a positive int, got {n!r}")


def _check_vertices(name: str, vertices: Tensor, C: int) -> Tensor:
    """Returns vertices as [C, V, 3]."""
    if not isinstance(vertices, Tensor) or vertices.ndim not in (2, 3) or vertices.shape[-1] != 3:
        raise ValueError(f"{name}: vertices must be a [V, 3] or [C, V, 3] tensor, got {_shape(vertices)}")
    if not vertices.is_floating_point():
        raise ValueError(f"{name}: vertices must be floating point, got {vertices.dtype}")
    if vertices.ndim == 3 and vertices.shape[0] != C:
        raise ValueError(f"{name}: vertices [C, V, 3] must have C = {C} (one per camera), got {vertices.shape[0]}")
    if not torch.isfinite(vertices).all():
        raise ValueError(f"{name}: vertices must be finite, got NaN or inf")
    return vertices.expand(C, -1, -1) if vertices.ndim == 2 else vertices


def _check_faces(name: str, faces: Tensor, V: int) -> None:
    if not isinstance(faces, Tensor) or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"{name}: faces must be an [F, 3] tensor, got {_shape(faces)}")
    if faces.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: faces must be int64 (or int32), got {faces.dtype}")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= V):
        raise ValueError(
            f"{name}: faces must index vertices in [0, {V}), got indices in [{int(faces.min())}, {int(faces.max())}]"
        )


def _check_fragments(name: str, fragments) -> None:
    if not isinstance(fragments, Fragments):
        raise ValueError(f"{name}: fragments must be a Fragments (from rasterize), got {type(fragments).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# visibility: the compiled kernel


@functools.cache
def _kernels():
    """Compile (or load from numba's cache) the visibility kernels. numba is imported here, not at module import."""
    import numba
    from numba import prange

    @numba.njit(cache=True)
    def bin_faces(px, py, pz, faces, width, height, near, band_rows):
        # px, py, pz: [V] pixel x, pixel y, camera z of one view; faces: [F, 3].
        # Returns the per-band lists of faces (CSR: starts [nb + 1], items [n]) and integer bounding boxes [F, 4].
        F = faces.shape[0]
        nb = (height + band_rows - 1) // band_rows
        bbox = np.empty((F, 4), np.int64)  # x0, x1, y0, y1 inclusive pixel ranges; y0 > y1 marks skipped faces
        counts = np.zeros(nb + 1, np.int64)
        for f in range(F):
            a, b, c = faces[f, 0], faces[f, 1], faces[f, 2]
            bbox[f, 2] = 1
            bbox[f, 3] = 0
            za, zb, zc = pz[a], pz[b], pz[c]
            if not (za >= near and zb >= near and zc >= near):  # also false for NaN
                continue
            xa, xb, xc = px[a], px[b], px[c]
            ya, yb, yc = py[a], py[b], py[c]
            xmin = min(xa, min(xb, xc))
            xmax = max(xa, max(xb, xc))
            ymin = min(ya, min(yb, yc))
            ymax = max(ya, max(yb, yc))
            if not (xmax >= 0.0 and ymax >= 0.0 and xmin <= width and ymin <= height):
                continue
            # pixels whose centre (i + 0.5) lies in [min, max]
            x0 = max(0, int(math.ceil(xmin - 0.5)))
            x1 = min(width - 1, int(math.floor(xmax - 0.5)))
            y0 = max(0, int(math.ceil(ymin - 0.5)))
            y1 = min(height - 1, int(math.floor(ymax - 0.5)))
            if x0 > x1 or y0 > y1:
                continue
            bbox[f, 0] = x0
            bbox[f, 1] = x1
            bbox[f, 2] = y0
            bbox[f, 3] = y1
            for bnd in range(y0 // band_rows, y1 // band_rows + 1):
                counts[bnd + 1] += 1
        for bnd in range(nb):
            counts[bnd + 1] += counts[bnd]
        items = np.empty(counts[nb], np.int64)
        fill = counts[:nb].copy()
        for f in range(F):  # ascending face order inside each band: depth ties go to the lower face id
            if bbox[f, 2] > bbox[f, 3]:
                continue
            for bnd in range(bbox[f, 2] // band_rows, bbox[f, 3] // band_rows + 1):
                items[fill[bnd]] = f
                fill[bnd] += 1
        return counts, items, bbox

    @numba.njit(parallel=True, cache=True, fastmath=True)
    def raster_bands(px, py, pz, faces, starts, items, bbox, width, height, band_rows, face_ids, depth):
        # px, py, pz: [V]; faces: [F, 3]; starts/items: band lists; bbox: [F, 4]; face_ids, depth: [H, W] outputs.
        nb = starts.shape[0] - 1
        for bnd in prange(nb):
            r0 = bnd * band_rows
            r1 = min(height, r0 + band_rows) - 1
            for y in range(r0, r1 + 1):
                for x in range(width):
                    face_ids[y, x] = -1
                    depth[y, x] = np.inf
            ax = np.empty(3, np.float64)
            ay = np.empty(3, np.float64)
            dx = np.empty(3, np.float64)
            dy = np.empty(3, np.float64)
            sk = np.empty(3, np.float64)
            own = np.empty(3, np.bool_)
            iz = np.empty(3, np.float64)
            for it in range(starts[bnd], starts[bnd + 1]):
                f = items[it]
                # edge k is opposite vertex k; it is evaluated from its lower-indexed vertex ("canonical" form) so
                # two triangles sharing it compute bit-identical values up to sign: watertight, one owner per tie.
                for k in range(3):
                    i = faces[f, (k + 1) % 3]
                    j = faces[f, (k + 2) % 3]
                    s = 1.0
                    if i > j:
                        i, j = j, i
                        s = -1.0
                    ax[k] = px[i]
                    ay[k] = py[i]
                    dx[k] = px[j] - px[i]
                    dy[k] = py[j] - py[i]
                    sk[k] = s
                    iz[k] = 1.0 / pz[faces[f, k]]
                v0 = faces[f, 0]
                area = sk[0] * (dx[0] * (py[v0] - ay[0]) - dy[0] * (px[v0] - ax[0]))  # 2 * signed area
                if area == 0.0 or not math.isfinite(area):
                    continue
                orient = 1.0 if area > 0.0 else -1.0
                for k in range(3):
                    sk[k] *= orient
                    # inward normal (gx, gy) = sk * (-dy, dx); the owner of a tie is the side with gx > 0, or
                    # gx == 0 and gy > 0 (the neighbour across the edge sees exactly the negated normal)
                    gx = -sk[k] * dy[k]
                    gy = sk[k] * dx[k]
                    own[k] = gx > 0.0 or (gx == 0.0 and gy > 0.0)
                y0 = max(bbox[f, 2], r0)
                y1 = min(bbox[f, 3], r1)
                x0 = bbox[f, 0]
                x1 = bbox[f, 1]
                for y in range(y0, y1 + 1):
                    cy = y + 0.5
                    for x in range(x0, x1 + 1):
                        cx = x + 0.5
                        inside = True
                        t0 = sk[0] * (dx[0] * (cy - ay[0]) - dy[0] * (cx - ax[0]))
                        t1 = sk[1] * (dx[1] * (cy - ay[1]) - dy[1] * (cx - ax[1]))
                        t2 = sk[2] * (dx[2] * (cy - ay[2]) - dy[2] * (cx - ax[2]))
                        if t0 < 0.0 or (t0 == 0.0 and not own[0]):
                            inside = False
                        if t1 < 0.0 or (t1 == 0.0 and not own[1]):
                            inside = False
                        if t2 < 0.0 or (t2 == 0.0 and not own[2]):
                            inside = False
                        if not inside:
                            continue
                        inv = (t0 * iz[0] + t1 * iz[1] + t2 * iz[2]) / (t0 + t1 + t2)
                        z = 1.0 / inv
                        if z < depth[y, x]:
                            depth[y, x] = z
                            face_ids[y, x] = f
            for y in range(r0, r1 + 1):
                for x in range(width):
                    if face_ids[y, x] < 0:
                        depth[y, x] = 0.0

    return bin_faces, raster_bands


def rasterize_visibility(
    pix: np.ndarray,  # [C, V, 2] pixel coordinates (x right, y down; pixel centres at i + 0.5)
    z: np.ndarray,  # [C, V] camera depth
    faces: np.ndarray,  # [F, 3] int vertex indices
    width: int,
    height: int,
    near: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """The non-differentiable visibility pass (numba). Returns ``face_ids [C, H, W] int64`` (-1 = background) and
    ``depth [C, H, W] float64`` (camera z of the nearest covering face, 0 = background).

    A pixel is covered by a face when its centre is inside the projected triangle; centres exactly on an edge shared
    by two triangles go to one of them (consistent tie rule). Faces with any vertex at camera z < ``near`` are
    skipped, as are degenerate (zero-area) faces. Depth ties go to the lower face id.
    """
    _check_size("rasterize_visibility", width, height)
    pix = np.asarray(pix)
    z = np.asarray(z)
    faces = np.asarray(faces)
    if pix.ndim != 3 or pix.shape[-1] != 2:
        raise ValueError(f"rasterize_visibility: pix must be [C, V, 2], got {pix.shape}")
    if z.shape != pix.shape[:2]:
        raise ValueError(f"rasterize_visibility: z must be [C, V] = {pix.shape[:2]}, got {z.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
        raise ValueError(f"rasterize_visibility: faces must be an integer [F, 3] array, got {faces.dtype}{faces.shape}")
    V = pix.shape[1]
    if faces.size and (faces.min() < 0 or faces.max() >= V):
        raise ValueError(f"rasterize_visibility: faces must index [0, {V}), got [{faces.min()}, {faces.max()}]")
    if not (near > 0 and math.isfinite(near)):
        raise ValueError(f"rasterize_visibility: near must be a positive finite float, got {near}")
    C = pix.shape[0]
    face_ids = np.full((C, height, width), -1, np.int64)
    depth = np.zeros((C, height, width), np.float64)
    if faces.shape[0] == 0 or V == 0:
        return face_ids, depth
    bin_faces, raster_bands = _kernels()
    faces = np.ascontiguousarray(faces, np.int64)
    for c in range(C):
        px = np.ascontiguousarray(pix[c, :, 0], np.float64)
        py = np.ascontiguousarray(pix[c, :, 1], np.float64)
        pz = np.ascontiguousarray(z[c], np.float64)
        starts, items, bbox = bin_faces(px, py, pz, faces, width, height, float(near), _BAND_ROWS)
        raster_bands(px, py, pz, faces, starts, items, bbox, width, height, _BAND_ROWS, face_ids[c], depth[c])
    return face_ids, depth


# ----------------------------------------------------------------------------------------------------------------
# differentiable pieces (torch)


def _project(vertices: Tensor, viewmats: Tensor, Ks: Tensor) -> tuple[Tensor, Tensor]:
    """vertices [C, V, 3] world -> pixel coordinates [C, V, 2] and camera z [C, V] (differentiable)."""
    return project_points(vertices, viewmats.to(vertices.dtype), Ks.to(vertices.dtype))


def _barycentrics(pix: Tensor, z: Tensor, faces: Tensor, face_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Perspective-correct barycentrics and depth of pixel centres, re-computed in torch.

    pix [C, V, 2], z [C, V], faces [F, 3], face_ids [C, H, W] -> bary [C, H, W, 3], depth [C, H, W] (0 outside).
    """
    C, H, W = face_ids.shape
    bary = pix.new_zeros(C, H, W, 3)
    depth = pix.new_zeros(C, H, W)
    c, yy, xx = torch.nonzero(face_ids >= 0, as_tuple=True)
    if c.numel() == 0:
        return bary, depth
    tri = faces[face_ids[c, yy, xx]]  # [N, 3]
    p = pix[c[:, None], tri]  # [N, 3, 2]
    zt = z[c[:, None], tri]  # [N, 3]
    q = torch.stack([xx, yy], -1).to(pix.dtype) + 0.5  # [N, 2] pixel centres
    # screen-space barycentrics: l_k = area(q, v_k+1, v_k+2) / area(v0, v1, v2)
    p1, p2 = p.roll(-1, 1), p.roll(-2, 1)
    d = p2 - p1
    e = d[..., 0] * (q[:, None, 1] - p1[..., 1]) - d[..., 1] * (q[:, None, 0] - p1[..., 0])
    area = (p[:, 2, 0] - p[:, 1, 0]) * (p[:, 0, 1] - p[:, 1, 1]) - (p[:, 2, 1] - p[:, 1, 1]) * (p[:, 0, 0] - p[:, 1, 0])
    lin = e / area[:, None]  # [N, 3]
    w = lin / zt
    inv_z = w.sum(-1)
    bary = bary.index_put((c, yy, xx), w / inv_z[:, None])
    depth = depth.index_put((c, yy, xx), 1.0 / inv_z)
    return bary, depth


def rasterize(
    vertices: Tensor,  # [V, 3] or [C, V, 3] world positions
    faces: Tensor,  # [F, 3] int64
    viewmats: Tensor,  # [C, 4, 4] world-to-camera
    Ks: Tensor,  # [C, 3, 3] pixel intrinsics
    width: int,
    height: int,
    near: float = 0.01,
) -> Fragments:
    """Rasterize a triangle mesh seen by C cameras. ``bary`` and ``depth`` are differentiable w.r.t. ``vertices``
    (re-computed in torch for the visible faces); ``face_ids`` come from the compiled visibility pass."""
    C = _check_cameras("rasterize", viewmats, Ks)
    _check_size("rasterize", width, height)
    verts = _check_vertices("rasterize", vertices, C)
    _check_faces("rasterize", faces, verts.shape[1])
    faces = faces.to(torch.int64)
    pix, z = _project(verts, viewmats, Ks)
    ids, _ = rasterize_visibility(
        pix.detach().cpu().double().numpy(), z.detach().cpu().double().numpy(), faces.cpu().numpy(), width, height, near
    )
    face_ids = torch.from_numpy(ids).to(vertices.device)
    bary, depth = _barycentrics(pix, z, faces.to(vertices.device), face_ids)
    return Fragments(face_ids=face_ids, bary=bary, depth=depth)


def interpolate(
    attributes: Tensor,  # [V, D] or [C, V, D] per-vertex attributes
    fragments: Fragments,
    faces: Tensor,  # [F, 3] int64, the faces that were rasterized
) -> Tensor:
    """Barycentric interpolation of vertex attributes -> ``[C, H, W, D]``; background pixels are 0.

    Differentiable w.r.t. ``attributes`` and, through ``fragments.bary``, w.r.t. the rasterized vertex positions.
    """
    _check_fragments("interpolate", fragments)
    C = fragments.face_ids.shape[0]
    if not isinstance(attributes, Tensor) or attributes.ndim not in (2, 3):
        raise ValueError(f"interpolate: attributes must be a [V, D] or [C, V, D] tensor, got {_shape(attributes)}")
    if attributes.ndim == 3 and attributes.shape[0] != C:
        raise ValueError(f"interpolate: attributes [C, V, D] must have C = {C}, got {attributes.shape[0]}")
    _check_faces("interpolate", faces, attributes.shape[-2])
    attrs = attributes.expand(C, -1, -1) if attributes.ndim == 2 else attributes
    ids = fragments.face_ids
    fg = ids >= 0
    if faces.shape[0] == 0:
        return attrs.new_zeros(*ids.shape, attrs.shape[-1])
    tri = faces.to(torch.int64)[ids.clamp(min=0)]  # [C, H, W, 3]
    cidx = torch.arange(C, device=ids.device)[:, None, None, None]
    vals = attrs[cidx, tri]  # [C, H, W, 3, D]
    bary = fragments.bary.to(attrs.dtype)
    out = (bary[..., None] * vals).sum(-2)
    return torch.where(fg[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def texture_sample(
    texture: Tensor,  # [Ht, Wt, Ch] texels
    uv: Tensor,  # [C, H, W, 2] texture coordinates in [0, 1]
    mask: Tensor | None = None,  # [C, H, W] bool, pixels to sample (others get 0)
) -> Tensor:
    """Bilinear texture lookup -> ``[C, H, W, Ch]``, differentiable w.r.t. ``texture`` and ``uv``.

    glTF convention: u = 0 is the left column, v = 0 the top row (row 0 of ``texture``); texel centres sit at
    ``(i + 0.5) / Wt``; coordinates outside [0, 1] clamp to the border texels.
    """
    if not isinstance(texture, Tensor) or texture.ndim != 3:
        raise ValueError(f"texture_sample: texture must be an [Ht, Wt, Ch] tensor, got {_shape(texture)}")
    if not isinstance(uv, Tensor) or uv.ndim != 4 or uv.shape[-1] != 2:
        raise ValueError(f"texture_sample: uv must be a [C, H, W, 2] tensor, got {_shape(uv)}")
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != uv.shape[:3]):
        raise ValueError(f"texture_sample: mask must be [C, H, W] = {tuple(uv.shape[:3])}, got {_shape(mask)}")
    C = uv.shape[0]
    tex = texture.permute(2, 0, 1)[None].expand(C, -1, -1, -1).to(uv.dtype)  # [C, Ch, Ht, Wt]
    out = F_.grid_sample(tex, uv * 2 - 1, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.permute(0, 2, 3, 1)  # [C, H, W, Ch]
    if mask is not None:
        out = torch.where(mask.bool()[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def _edge_distances(p: Tensor, q: Tensor) -> Tensor:
    """Signed distances (pixels, positive inside) from points q [..., 2] to the three edge lines of triangles
    p [..., 3, 2]; edge k is opposite vertex k. Returns [..., 3]."""
    p1, p2 = p.roll(-1, -2), p.roll(-2, -2)
    d = p2 - p1
    e = d[..., 0] * (q[..., None, 1] - p1[..., 1]) - d[..., 1] * (q[..., None, 0] - p1[..., 0])
    area = (p[..., 2, 0] - p[..., 1, 0]) * (p[..., 0, 1] - p[..., 1, 1]) - (p[..., 2, 1] - p[..., 1, 1]) * (
        p[..., 0, 0] - p[..., 1, 0]
    )
    sign = torch.where(area < 0, -1.0, 1.0).to(p.dtype)
    return sign[..., None] * e / d.norm(dim=-1).clamp(min=1e-12)


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def soft_silhouette(
    vertices: Tensor,  # [V, 3] or [C, V, 3] world positions
    faces: Tensor,  # [F, 3] int64
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    fragments: Fragments | None = None,
    sigma_px: float = 0.7,
) -> Tensor:
    """Silhouette ``[C, H, W]`` in [0, 1] whose boundary pixels are differentiable w.r.t. the vertex positions.

    Interior pixels are 1 and far background 0 (no gradient). On the one-pixel ring at the foreground/background
    boundary (8-neighbourhood) the coverage is ``sigmoid(d / sigma_px)`` with ``d`` a signed pixel distance to the
    silhouette edge: for a background pixel, the largest over the faces of its foreground neighbours of the minimum
    signed distance to that face's edge lines (negative); for a foreground pixel, the distance to the nearest edge of
    its own face that separates it from a background neighbour (positive). A pixel centre crossing an edge keeps its
    value (0.5 on both sides), so the coverage is continuous there. Pass ``fragments`` to skip re-rasterizing.
    """
    C = _check_cameras("soft_silhouette", viewmats, Ks)
    _check_size("soft_silhouette", width, height)
    verts = _check_vertices("soft_silhouette", vertices, C)
    _check_faces("soft_silhouette", faces, verts.shape[1])
    if not sigma_px > 0:
        raise ValueError(f"soft_silhouette: sigma_px must be > 0, got {sigma_px}")
    faces = faces.to(torch.int64)
    if fragments is None:
        fragments = rasterize(verts, faces, viewmats, Ks, width, height)
    _check_fragments("soft_silhouette", fragments)
    if fragments.face_ids.shape != (C, height, width):
        raise ValueError(
            f"soft_silhouette: fragments must be [C, H, W] = {(C, height, width)}, "
            f"got {tuple(fragments.face_ids.shape)}"
        )
    pix, _ = _project(verts, viewmats, Ks)
    ids = fragments.face_ids
    fg = ids >= 0
    alpha = fg.to(verts.dtype)
    if faces.shape[0] == 0:
        return alpha
    padded = F_.pad(ids, (1, 1, 1, 1), value=-1)
    nbr = torch.stack([padded[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] for dy, dx in _NEIGHBOURS], -1)
    offsets = torch.tensor(_NEIGHBOURS, dtype=verts.dtype, device=verts.device).flip(-1)  # [8, 2] as (dx, dy)

    # background ring: coverage from the faces of the foreground neighbours
    c, yy, xx = torch.nonzero(~fg & (nbr >= 0).any(-1), as_tuple=True)
    if c.numel():
        nf = nbr[c, yy, xx]  # [N, 8]
        p = pix[c[:, None, None], faces[nf.clamp(min=0)]]  # [N, 8, 3, 2]
        q = (torch.stack([xx, yy], -1).to(verts.dtype) + 0.5)[:, None].expand(-1, 8, -1)
        d = _edge_distances(p, q).amin(-1)  # [N, 8]
        s = torch.where(nf >= 0, torch.sigmoid(d / sigma_px), torch.zeros((), dtype=d.dtype, device=d.device))
        alpha = alpha.index_put((c, yy, xx), s.amax(-1))

    # foreground ring: distance to the own face's edges that separate the pixel from a background neighbour
    c, yy, xx = torch.nonzero(fg & (nbr < 0).any(-1), as_tuple=True)
    if c.numel():
        p = pix[c[:, None], faces[ids[c, yy, xx]]]  # [N, 3, 2]
        q = torch.stack([xx, yy], -1).to(verts.dtype) + 0.5  # [N, 2]
        d_own = _edge_distances(p, q)  # [N, 3]
        qn = q[:, None] + offsets  # [N, 8, 2] neighbour centres
        d_nbr = _edge_distances(p[:, None].expand(-1, 8, -1, -1), qn)  # [N, 8, 3]
        bg_nbr = (nbr[c, yy, xx] < 0)[..., None]  # [N, 8, 1]
        exposed = ((d_nbr.detach() < 0) & bg_nbr).any(1)  # [N, 3]
        big = torch.full((), float("inf"), dtype=d_own.dtype, device=d_own.device)
        d = torch.where(exposed, d_own, big).amin(-1)
        s = torch.where(torch.isfinite(d), torch.sigmoid(d.clamp(max=1e6) / sigma_px), torch.ones_like(d))
        alpha = alpha.index_put((c, yy, xx), s)
    return alpha


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted unit vertex normals ``[..., V, 3]`` of ``vertices [..., V, 3]``, ``faces [F, 3]``
    (counter-clockwise faces seen from outside give outward normals)."""
    tri = vertices[..., faces, :]  # [..., F, 3, 3]
    n = torch.linalg.cross(tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :])
    out = torch.zeros_like(vertices)
    out = out.index_add(-2, faces.reshape(-1), n.repeat_interleave(3, dim=-2))
    return out / out.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def render_mesh(
    vertices: Tensor,  # [V, 3] or [C, V, 3] world positions
    faces: Tensor,  # [F, 3] int64
    colors: Tensor | None,  # [V, 3] or [C, V, 3] in [0, 1]; None for a uniform skin tone
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    background: tuple[float, float, float] = (0.0, 0.0, 0.0),
    shading: bool = True,
    near: float = 0.01,
    sigma_px: float = 0.7,
) -> MeshRenderOutput:
    """Rasterize, interpolate colours and camera-space normals, optionally Lambert-shade with a headlight
    (``0.3 + 0.7 * max(0, -n_z)``), and composite over ``background`` with the hard mask. ``alpha`` is the soft
    silhouette (edge gradients); the image itself is not antialiased."""
    C = _check_cameras("render_mesh", viewmats, Ks)
    _check_size("render_mesh", width, height)
    verts = _check_vertices("render_mesh", vertices, C)
    _check_faces("render_mesh", faces, verts.shape[1])
    if len(background) != 3:
        raise ValueError(f"render_mesh: background must be 3 floats, got {background!r}")
    faces = faces.to(torch.int64)
    if colors is None:
        colors = verts.new_tensor([0.82, 0.68, 0.58]).expand(verts.shape[1], 3)
    if not isinstance(colors, Tensor) or colors.shape[-2:] != (verts.shape[1], 3) or colors.ndim not in (2, 3):
        raise ValueError(
            f"render_mesh: colors must be [V, 3] or [C, V, 3] with V = {verts.shape[1]}, got {_shape(colors)}"
        )
    frags = rasterize(verts, faces, viewmats, Ks, width, height, near)
    mask = frags.mask
    cam = verts @ viewmats[:, :3, :3].to(verts.dtype).transpose(-1, -2)  # rotation only: normals
    normals = interpolate(vertex_normals(cam, faces), frags, faces)
    normals = normals / normals.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    rgb = interpolate(colors.to(verts.dtype), frags, faces)
    if shading:
        rgb = rgb * (0.3 + 0.7 * (-normals[..., 2]).clamp(min=0.0))[..., None]
    bg = verts.new_tensor(background)
    image = torch.where(mask[..., None], rgb, bg).clamp(0.0, 1.0)
    alpha = soft_silhouette(verts, faces, viewmats, Ks, width, height, fragments=frags, sigma_px=sigma_px)
    return MeshRenderOutput(
        image=image, mask=mask, alpha=alpha, depth=frags.depth, normals=normals, face_ids=frags.face_ids
    )
