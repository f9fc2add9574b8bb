"""Canonical representations of an avatar: Gaussians skinned to a body model."""

from avatar.represent.avatar import AvatarLR, GaussianAvatar, initial_colors, knn, sample_surface

__all__ = ["AvatarLR", "GaussianAvatar", "initial_colors", "knn", "sample_surface"]
