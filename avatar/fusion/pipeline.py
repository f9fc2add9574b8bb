"""Views -> canonical mesh: canonicalize every view's depth layers and codes, fuse them, and the inputs for it.

``fuse_views`` takes per-view layers in the form of ``avatar.predict.infer.ViewPrediction`` (any object with
``mask``, ``depth_front``, ``depth_back``, ``codes_front``, ``codes_back``; :class:`ViewLayers` is ours), the
cameras, and each view's bone transforms. ``oracle_views`` makes such layers from a ground-truth posed mesh (the
upper bound of what a predictor could give: exact depth, codes of the true weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from avatar.fusion.canonicalize import CanonicalPoints, canonicalize_view
from avatar.fusion.fuse import FusedMesh, FusionConfig, TemplatePrior, fuse_points
from avatar.predict.views import render_depth_layers
from avatar.types import Cameras

_FIELDS = ("mask", "depth_front", "depth_back", "codes_front", "codes_back")


@dataclass(frozen=True)
class ViewLayers:
    """One view's layers (the fields of ``avatar.predict.infer.ViewPrediction``).

    mask: [H, W] bool; depth_front, depth_back: [H, W] camera z, metres (0 = empty);
    codes_front, codes_back: [H, W, 3] skinning codes.
    """

    mask: Tensor
    depth_front: Tensor
    depth_back: Tensor
    codes_front: Tensor
    codes_back: Tensor


def canonicalize_views(views: Sequence, cameras: Cameras, transforms: Tensor, codec,
                       cfg: FusionConfig = FusionConfig()) -> CanonicalPoints:
    """Every view's both layers as one :class:`CanonicalPoints`. ``transforms`` is ``[C, J, 4, 4]`` (one pose per
    view) or ``[J, 4, 4]`` (the same pose for all: a multi-camera capture of one instant)."""
    if not isinstance(cameras, Cameras):
        raise TypeError(f"canonicalize_views: cameras must be a Cameras, got {type(cameras).__name__}")
    views = list(views)
    C = 1 if cameras.viewmats.ndim == 2 else cameras.viewmats.shape[0]
    if len(views) != C:
        raise ValueError(f"canonicalize_views: {len(views)} views but {C} cameras")
    if transforms.ndim == 3:
        transforms = transforms.expand(C, -1, -1, -1)
    if transforms.ndim != 4 or transforms.shape[0] != C:
        raise ValueError(f"canonicalize_views: transforms must be [J, 4, 4] or [{C}, J, 4, 4], got {tuple(transforms.shape)}")
    viewmats = cameras.viewmats.reshape(C, 4, 4)
    Ks = cameras.Ks.reshape(C, 3, 3)
    parts = []
    for i, v in enumerate(views):
        missing = [f for f in _FIELDS if not hasattr(v, f)]
        if missing:
            raise TypeError(f"canonicalize_views: view {i} ({type(v).__name__}) lacks {missing}")
        if tuple(v.mask.shape) != (cameras.height, cameras.width):
            raise ValueError(f"canonicalize_views: view {i} is {tuple(v.mask.shape)} (H, W) but the cameras are "
                             f"{cameras.height}x{cameras.width}")
        parts.append(canonicalize_view(v.mask, v.depth_front, v.depth_back, v.codes_front, v.codes_back, Ks[i],
                                       viewmats[i], transforms[i], codec, view_index=i, max_step_px=cfg.max_step_px,
                                       min_confidence=cfg.min_confidence))
    return CanonicalPoints.cat(parts)


def fuse_views(views: Sequence, cameras: Cameras, transforms: Tensor, codec, cfg: FusionConfig = FusionConfig(),
               template: TemplatePrior | None = None) -> FusedMesh:
    """Canonicalize ``views`` (see :func:`canonicalize_views`) and fuse them into a :class:`FusedMesh`."""
    cloud = canonicalize_views(views, cameras, transforms, codec, cfg)
    return fuse_points(cloud, cfg, template)


def oracle_views(vertices: Tensor, faces: Tensor, skin_weights: Tensor, cameras: Cameras, codec) -> list[ViewLayers]:
    """Ground-truth layers of a posed mesh (``vertices [V, 3]`` world, ``faces [F, 3]``) with the codes of its true
    per-vertex weights ``skin_weights [V, J]`` (``codec.encode``, interpolated over faces like an image would be)."""
    with torch.no_grad():
        codes = codec.encode(skin_weights.float()).to(vertices.dtype)
    out = []
    viewmats = cameras.viewmats.reshape(-1, 4, 4)
    Ks = cameras.Ks.reshape(-1, 3, 3)
    for c in range(viewmats.shape[0]):
        lay = render_depth_layers(vertices, faces, viewmats[c].to(vertices.dtype), Ks[c].to(vertices.dtype),
                                  cameras.width, cameras.height, vertex_attrs=codes)
        out.append(ViewLayers(lay.mask, lay.depth_front, lay.depth_back, lay.attrs_front, lay.attrs_back))
    return out


def body_template(body, shape: Tensor) -> TemplatePrior:
    """The naked body model's canonical surface for ``shape [S]`` as a :class:`TemplatePrior`."""
    with torch.no_grad():
        rest = body.rest(shape.reshape(1, -1).to(body.dtype))
    return TemplatePrior(rest.vertices[0], body.faces, body.dense_skin_weights())
