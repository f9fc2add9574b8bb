"""Per-view canonicalization: depth layers + skinning codes of one posed view -> oriented points in canonical space.

Steps for each layer (front, back) of a view:

1. back-project the depth map with the camera (``avatar.predict.views.backproject``) to posed world points;
2. estimate a normal per pixel from the image gradients of that point map (central differences, cross product),
   oriented by the layer: the front layer faces the camera (``n . ray < 0``), the back layer faces away. Pixels whose
   four neighbours are not all covered, or whose depth jumps to a neighbour by more than ``max_step_px`` pixel
   footprints (a depth discontinuity such as an arm in front of the torso), get no normal and are dropped;
3. decode the skinning codes to weights (``SkinCodec.decode``);
4. inverse LBS with the view's bone transforms (``avatar.skinning.lbs.inverse_lbs_points``); normals are rotated by
   the inverse of the blended linear part (``n_c ~ A^T n_p``), the exact normal map of the inverse transform.

Each point also gets a confidence ``|n . ray|`` (clamped below): surfaces seen at grazing angles are sampled sparsely
and their depth is least reliable.

Hand-written because it is glue between our camera, codec and skinning conventions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F_
from torch import Tensor

from avatar.predict.views import backproject, pixel_rays
from avatar.skinning.lbs import blend_transforms, inverse_lbs_points


@dataclass(frozen=True)
class CanonicalPoints:
    """Oriented points lifted from views into canonical space.

    points:     [N, 3] canonical positions, metres.
    normals:    [N, 3] unit canonical normals (outwards).
    weights:    [N, J] decoded skinning weights (rows sum to 1).
    confidence: [N] in (0, 1], ``|n . ray|`` of the view the point came from.
    view:       [N] int64 index of the view.
    layer:      [N] int64, 0 = front, 1 = back.
    """

    points: Tensor
    normals: Tensor
    weights: Tensor
    confidence: Tensor
    view: Tensor
    layer: Tensor

    def __len__(self) -> int:
        return int(self.points.shape[0])

    @staticmethod
    def cat(parts: list["CanonicalPoints"]) -> "CanonicalPoints":
        if not parts:
            raise ValueError("CanonicalPoints.cat: nothing to concatenate")
        return CanonicalPoints(*(torch.cat([getattr(p, f) for p in parts]) for f in
                                 ("points", "normals", "weights", "confidence", "view", "layer")))


def depth_normals(points: Tensor, mask: Tensor, depth: Tensor, K: Tensor, max_step_px: float = 6.0) -> tuple[Tensor, Tensor]:
    """Un-oriented normals ``[H, W, 3]`` of a point map ``points [H, W, 3]`` (world) from its image gradients, and
    the ``[H, W]`` bool map of pixels where they are defined (covered, four covered neighbours, no depth jump larger
    than ``max_step_px`` pixel footprints ``z / f``)."""
    H, W = mask.shape
    valid = torch.zeros_like(mask)
    normals = torch.zeros_like(points)
    if H < 3 or W < 3:
        return normals, valid
    c = mask[1:-1, 1:-1]
    l, r, u, d = mask[1:-1, :-2], mask[1:-1, 2:], mask[:-2, 1:-1], mask[2:, 1:-1]
    z = depth[1:-1, 1:-1]
    foot = z / K[0, 0].abs().clamp(min=1e-12) * max_step_px
    steps = torch.stack([(depth[1:-1, :-2] - z).abs(), (depth[1:-1, 2:] - z).abs(),
                         (depth[:-2, 1:-1] - z).abs(), (depth[2:, 1:-1] - z).abs()]).amax(0)
    ok = c & l & r & u & d & (steps <= foot)
    dx = points[1:-1, 2:] - points[1:-1, :-2]
    dy = points[2:, 1:-1] - points[:-2, 1:-1]
    n = torch.linalg.cross(dx, dy)
    norm = n.norm(dim=-1, keepdim=True)
    ok = ok & (norm[..., 0] > 0)
    n = n / norm.clamp(min=1e-20)
    normals[1:-1, 1:-1] = torch.where(ok[..., None], n, torch.zeros_like(n))
    valid[1:-1, 1:-1] = ok
    return normals, valid


def canonicalize_layer(
    depth: Tensor,  # [H, W] camera z, metres (0 = empty)
    codes: Tensor,  # [H, W, 3] skinning codes
    mask: Tensor,  # [H, W] bool
    K: Tensor,  # [3, 3]
    viewmat: Tensor,  # [4, 4] world-to-camera
    transforms: Tensor,  # [J, 4, 4] canonical -> posed bone transforms of the view's pose
    codec,  # SkinCodec
    back: bool,
    max_step_px: float = 6.0,
    min_confidence: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One layer -> ``(points [N, 3], normals [N, 3], weights [N, J], confidence [N])`` in canonical space."""
    dtype = transforms.dtype
    depth = depth.to(dtype)
    K = K.to(dtype)
    viewmat = viewmat.to(dtype)
    m = mask.bool() & (depth > 0)
    posed = backproject(depth, K, viewmat)  # [H, W, 3]
    normals, ok = depth_normals(posed, m, depth, K, max_step_px)
    R = viewmat[:3, :3]
    rays = F_.normalize(pixel_rays(K, *depth.shape) @ R, dim=-1)  # world ray directions [H, W, 3]
    cos = (normals * rays).sum(-1)
    sign = torch.where(cos > 0, -1.0, 1.0).to(dtype)  # now n . ray < 0: faces the camera
    if back:
        sign = -sign
    normals = normals * sign[..., None]
    conf = cos.abs().clamp(min=min_confidence, max=1.0)
    sel = ok
    p, n, c = posed[sel], normals[sel], conf[sel]
    with torch.no_grad():
        w = codec.decode(codes[sel].to(next(codec.parameters()).dtype)).to(dtype)  # [N, J]
    canon = inverse_lbs_points(p, w, transforms)
    A = blend_transforms(w, transforms)  # [N, 3, 4]
    nc = (A[..., :3].transpose(-1, -2) * n.unsqueeze(-2)).sum(-1)  # A^T n
    nc = F_.normalize(nc, dim=-1)
    return canon, nc, w, c


def canonicalize_view(
    mask: Tensor,  # [H, W] bool
    depth_front: Tensor,  # [H, W]
    depth_back: Tensor,  # [H, W]
    codes_front: Tensor,  # [H, W, 3]
    codes_back: Tensor,  # [H, W, 3]
    K: Tensor,  # [3, 3]
    viewmat: Tensor,  # [4, 4]
    transforms: Tensor,  # [J, 4, 4]
    codec,
    view_index: int = 0,
    max_step_px: float = 6.0,
    min_confidence: float = 0.1,
) -> CanonicalPoints:
    """Both layers of one view as :class:`CanonicalPoints`."""
    H, W = mask.shape
    for name, t, shape in (("depth_front", depth_front, (H, W)), ("depth_back", depth_back, (H, W)),
                           ("codes_front", codes_front, (H, W, 3)), ("codes_back", codes_back, (H, W, 3))):
        if tuple(t.shape) != shape:
            raise ValueError(f"canonicalize_view: view {view_index}: {name} must be {list(shape)} like the mask, "
                             f"got {tuple(t.shape)}")
    if transforms.ndim != 3 or transforms.shape[-2:] != (4, 4) or transforms.shape[0] != codec.num_bones:
        raise ValueError(f"canonicalize_view: transforms must be [{codec.num_bones}, 4, 4], got {tuple(transforms.shape)}")
    parts = []
    for layer, (d, c) in enumerate(((depth_front, codes_front), (depth_back, codes_back))):
        p, n, w, conf = canonicalize_layer(d, c, mask, K, viewmat, transforms, codec, back=layer == 1,
                                           max_step_px=max_step_px, min_confidence=min_confidence)
        idx = torch.full((p.shape[0],), view_index, dtype=torch.int64)
        parts.append(CanonicalPoints(p, n, w, conf, idx, torch.full_like(idx, layer)))
    return CanonicalPoints.cat(parts)
