"""Skinning: canonical -> posed (forward LBS / DQS) and posed -> canonical (inverse LBS)."""

from avatar.skinning.lbs import (
    blend_transforms,
    dqs_points,
    inverse_lbs_points,
    lbs_points,
    polar_rotation,
    skin_covariances,
    skin_gaussians,
)

__all__ = [
    "blend_transforms",
    "dqs_points",
    "inverse_lbs_points",
    "lbs_points",
    "polar_rotation",
    "skin_covariances",
    "skin_gaussians",
]
