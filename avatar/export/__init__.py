"""Exports: avatar bundle (safetensors + JSON), 3DGS ``.ply``, videos, rigged ``.glb``, OBJ/PLY meshes (see design.md)."""

from avatar.export.bundle import Bundle, load_bundle, save_bundle
from avatar.export.gltf import GlbAnimation, GltfSkin, read_glb, write_glb
from avatar.export.mesh_io import read_mesh, write_mesh, write_posed_mesh
from avatar.export.ply import read_splat_ply, splat_property_names, write_splat_ply
from avatar.export.video import VideoInfo, render_motion_video, write_video

__all__ = [
    "Bundle", "VideoInfo", "load_bundle", "read_splat_ply", "render_motion_video", "save_bundle",
    "splat_property_names", "write_splat_ply", "write_video",
    "GlbAnimation", "GltfSkin", "read_glb", "read_mesh", "write_glb", "write_mesh", "write_posed_mesh",
]
