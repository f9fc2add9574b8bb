"""Exports: avatar bundle (safetensors + JSON), 3DGS ``.ply``, videos (see design.md)."""

from avatar.export.bundle import Bundle, load_bundle, save_bundle
from avatar.export.ply import read_splat_ply, splat_property_names, write_splat_ply
from avatar.export.video import VideoInfo, render_motion_video, write_video

__all__ = [
    "Bundle", "VideoInfo", "load_bundle", "read_splat_ply", "render_motion_video", "save_bundle",
    "splat_property_names", "write_splat_ply", "write_video",
]
