"""Canonical representations of an avatar: Gaussians skinned to a body model."""

from avatar.represent.avatar import AvatarLR, GaussianAvatar, initial_colors, knn, sample_surface
from avatar.represent.mesh_gaussians import MeshBinding, avatar_from_mesh, bind_to_faces, mesh_gaussians

__all__ = ["AvatarLR", "GaussianAvatar", "initial_colors", "knn", "sample_surface",
           "MeshBinding", "avatar_from_mesh", "bind_to_faces", "mesh_gaussians"]
