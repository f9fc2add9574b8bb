"""Slow, readable torch reference for 3D Gaussian splatting (gradients from autograd).

This is the specification the compiled CPU backend (``gaussians_cpu``) is tested against, and it follows gsplat's
(v1.5) conventions step by step:

* projection: EWA splatting of ``R S S^T R^T`` through the pinhole Jacobian, with ``x/z`` and ``y/z`` clamped to the
  image extent plus 30 % of the half field of view (``1.3 * tan(fov/2)`` for a centred principal point), a 0.3 px
  low-pass added to the 2D covariance diagonal (no antialiasing compensation), culling of Gaussians with
  ``z < near`` (0.01) or ``z > far`` (1e10), of Gaussians with opacity < 1/255, and of Gaussians whose box misses the
  image;
* screen-space box (per axis, as gsplat's ``ProjectionEWA3DGSFused``): ``radius = ceil(e * sqrt(Sigma2D_ii))`` with
  ``e = min(3.33, sqrt(2 ln(255 * opacity)))``, which is exactly the box of the ellipse where alpha >= 1/255;
* tiles of 16x16 px; a Gaussian is composited in a tile iff its box overlaps the tile;
* pixel centres at ``(x + 0.5, y + 0.5)``, ``alpha = min(0.999, opacity * exp(-0.5 d^T Sigma2D^-1 d))``, skipped when
  below 1/255; front-to-back compositing in depth order, a pixel stops before the Gaussian that would bring its
  transmittance to ``<= 1e-4``.

The rasterizer here loops over tiles in Python and composites each tile densely (pixels x Gaussians of that tile);
it is meant for tests and small scenes only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TILE = 16
EPS2D = 0.3
NEAR = 0.01
FAR = 1e10
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4
EXTEND_MAX = 3.33


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] from (unnormalized) wxyz quaternions [..., 4]."""
    w, x, y, z = torch.unbind(quats / quats.norm(dim=-1, keepdim=True), dim=-1)
    R = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1)
    return R.reshape(quats.shape[:-1] + (3, 3))


def project_gaussians(
    means: Tensor,  # [N, 3] world
    quats: Tensor,  # [N, 4] wxyz
    scales: Tensor,  # [N, 3] linear
    opacities: Tensor,  # [N]
    viewmats: Tensor,  # [C, 4, 4] world-to-camera (OpenCV)
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """EWA projection. Returns ``means2d [C,N,2]``, ``conics [C,N,3]`` (upper triangle of Sigma2D^-1: a, b, c),
    ``depths [C,N]`` (camera z), ``radii [C,N,2]`` (int32, 0 for culled) and ``covars2d [C,N,2,2]`` (with the low-pass).
    Culled Gaussians get zeros in every output, as in gsplat."""
    M = quat_to_rotmat(quats) * scales[:, None, :]  # [N, 3, 3]
    covars = M @ M.transpose(-1, -2)  # [N, 3, 3]
    Rv, tv = viewmats[:, :3, :3], viewmats[:, :3, 3]  # [C, 3, 3], [C, 3]
    means_c = torch.einsum("cij,nj->cni", Rv, means) + tv[:, None, :]  # [C, N, 3]
    covars_c = torch.einsum("cij,njk,clk->cnil", Rv, covars, Rv)  # [C, N, 3, 3]

    tx, ty, tz = means_c.unbind(-1)  # [C, N]
    in_depth = (tz >= NEAR) & (tz <= FAR)
    tz = torch.where(in_depth, tz, torch.ones_like(tz))  # keeps culled Gaussians finite (and their gradients zero)
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    ux = torch.minimum(torch.maximum(tx / tz, -(cx / fx + 0.3 * tan_fovx)), (width - cx) / fx + 0.3 * tan_fovx)
    uy = torch.minimum(torch.maximum(ty / tz, -(cy / fy + 0.3 * tan_fovy)), (height - cy) / fy + 0.3 * tan_fovy)
    zero = torch.zeros_like(tz)
    J = torch.stack([fx / tz, zero, -fx * ux / tz, zero, fy / tz, -fy * uy / tz], dim=-1).reshape(tz.shape + (2, 3))
    covars2d = J @ covars_c @ J.transpose(-1, -2) + EPS2D * torch.eye(2, dtype=means.dtype)  # [C, N, 2, 2]
    means2d = torch.stack([fx * tx / tz + cx, fy * ty / tz + cy], dim=-1)  # [C, N, 2]

    a, b, c = covars2d[..., 0, 0], 0.5 * (covars2d[..., 0, 1] + covars2d[..., 1, 0]), covars2d[..., 1, 1]
    det = a * c - b * b
    ok = in_depth & (det > 0) & (opacities >= ALPHA_MIN)[None, :]
    det = torch.where(ok, det, torch.ones_like(det))
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)  # [C, N, 3]

    with torch.no_grad():
        extend = torch.sqrt(2.0 * torch.log(opacities.clamp_min(ALPHA_MIN) / ALPHA_MIN)).clamp_max(EXTEND_MAX)
        rx = torch.ceil(extend * torch.sqrt(a.clamp_min(0)))
        ry = torch.ceil(extend * torch.sqrt(c.clamp_min(0)))
        mx, my = means2d[..., 0], means2d[..., 1]
        inside = (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
        ok = ok & inside & ((rx > 0) | (ry > 0))
        radii = torch.where(ok[..., None], torch.stack([rx, ry], -1), torch.zeros_like(means2d)).to(torch.int32)

    okf = ok.to(means.dtype)
    return (means2d * okf[..., None], conics * okf[..., None], means_c[..., 2] * okf, radii,
            covars2d * okf[..., None, None])


def tile_ranges(means2d: Tensor, radii: Tensor, width: int, height: int) -> Tensor:
    """Tiles ``[xmin, xmax) x [ymin, ymax)`` touched by each Gaussian's box: int64 [..., 4] (gsplat's isect rule)."""
    tw, th = math.ceil(width / TILE), math.ceil(height / TILE)
    m, r = means2d.detach().double() / TILE, radii.double() / TILE
    xmin = torch.floor(m[..., 0] - r[..., 0]).clamp(0, tw)
    xmax = torch.ceil(m[..., 0] + r[..., 0]).clamp(0, tw)
    ymin = torch.floor(m[..., 1] - r[..., 1]).clamp(0, th)
    ymax = torch.ceil(m[..., 1] + r[..., 1]).clamp(0, th)
    live = (radii > 0).any(-1)
    out = torch.stack([xmin, xmax, ymin, ymax], -1).long()
    return torch.where(live[..., None], out, torch.zeros_like(out))


def rasterize_projected(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [C, N]
    feats: Tensor,  # [C, N, K] (colors, and for depth maps the camera z as one more channel)
    radii: Tensor,  # [C, N, 2] int
    depths: Tensor,  # [C, N] sort keys
    width: int,
    height: int,
) -> tuple[Tensor, Tensor]:
    """Composite projected Gaussians (no background): ``feats [C,H,W,K]`` and ``alphas [C,H,W]``."""
    C, N, K = feats.shape
    tw, th = math.ceil(width / TILE), math.ceil(height / TILE)
    ranges = tile_ranges(means2d, radii, width, height)  # [C, N, 4]
    out_rows, alpha_rows = [], []
    for ci in range(C):
        order = torch.argsort(depths[ci].detach(), stable=True)
        r = ranges[ci, order]
        img = feats.new_zeros(height, width, K)
        alp = feats.new_zeros(height, width)
        rows_f, rows_a = [], []
        for ty in range(th):
            cols_f, cols_a = [], []
            for tx in range(tw):
                x0, y0 = tx * TILE, ty * TILE
                x1, y1 = min(x0 + TILE, width), min(y0 + TILE, height)
                hit = (r[:, 0] <= tx) & (tx < r[:, 1]) & (r[:, 2] <= ty) & (ty < r[:, 3])
                ids = order[hit]
                ys, xs = torch.meshgrid(torch.arange(y0, y1, dtype=feats.dtype) + 0.5,
                                        torch.arange(x0, x1, dtype=feats.dtype) + 0.5, indexing="ij")
                if len(ids) == 0:
                    cols_f.append(feats.new_zeros(y1 - y0, x1 - x0, K))
                    cols_a.append(feats.new_zeros(y1 - y0, x1 - x0))
                    continue
                dx = means2d[ci, ids, 0] - xs.reshape(-1, 1)  # [P, M]
                dy = means2d[ci, ids, 1] - ys.reshape(-1, 1)
                A, B, Cc = conics[ci, ids].unbind(-1)
                sigma = 0.5 * (A * dx * dx + Cc * dy * dy) + B * dx * dy
                alpha = torch.clamp_max(opacities[ci, ids] * torch.exp(-sigma), ALPHA_MAX)
                alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))
                with torch.no_grad():  # stop rule: drop the Gaussian that brings T to <= 1e-4 and all behind it
                    next_T = torch.cumprod(1 - alpha, dim=1)
                    alpha_keep = next_T > T_MIN
                alpha = alpha * alpha_keep
                one_minus = 1 - alpha
                T = torch.cumprod(torch.cat([torch.ones_like(one_minus[:, :1]), one_minus[:, :-1]], 1), 1)
                w = alpha * T  # [P, M]
                cols_f.append((w @ feats[ci, ids]).reshape(y1 - y0, x1 - x0, K))
                cols_a.append(w.sum(1).reshape(y1 - y0, x1 - x0))
            rows_f.append(torch.cat(cols_f, 1))
            rows_a.append(torch.cat(cols_a, 1))
        img, alp = torch.cat(rows_f, 0), torch.cat(rows_a, 0)
        out_rows.append(img)
        alpha_rows.append(alp)
    return torch.stack(out_rows), torch.stack(alpha_rows)
