"""Canonicalization of sparse views (inverse LBS of back-projected depth layers with decoded skinning weights) and
their fusion into one clothed canonical mesh with skinning weights. See design.md."""

from avatar.fusion.canonicalize import CanonicalPoints, canonicalize_layer, canonicalize_view, depth_normals
from avatar.fusion.fuse import FusedMesh, FusionConfig, TemplatePrior, fuse_points
from avatar.fusion.pipeline import ViewLayers, body_template, canonicalize_views, fuse_views, oracle_views
from avatar.fusion.quality import MeshQuality, mesh_quality

__all__ = [
    "CanonicalPoints", "canonicalize_layer", "canonicalize_view", "depth_normals",
    "FusedMesh", "FusionConfig", "TemplatePrior", "fuse_points",
    "ViewLayers", "body_template", "canonicalize_views", "fuse_views", "oracle_views",
    "MeshQuality", "mesh_quality",
]
