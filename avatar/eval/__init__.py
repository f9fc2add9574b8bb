"""Image and geometry metrics, evaluation of a renderer on protocol frames, reports (see design.md)."""

from avatar.eval.metrics import (
    GeometryError,
    LpipsStatus,
    geometry_error,
    lpips_metric,
    mask_bbox,
    nearest_point_distance,
    point_to_mesh_distance,
    psnr,
    sample_mesh_surface,
    ssim,
)
from avatar.eval.report import EvalReport, FrameResult, SplitSummary, evaluate, write_report

__all__ = [
    "EvalReport", "FrameResult", "GeometryError", "LpipsStatus", "SplitSummary", "evaluate", "geometry_error",
    "lpips_metric", "mask_bbox", "nearest_point_distance", "point_to_mesh_distance", "psnr", "sample_mesh_surface",
    "ssim", "write_report",
]
