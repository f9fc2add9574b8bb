"""Skinning: canonical -> posed (forward LBS / DQS), posed -> canonical (inverse LBS), learned weight fields."""

from avatar.skinning.control import (
    ControlPointConfig,
    ControlPointDeformer,
    PerGaussianConfig,
    PerGaussianDeformer,
    arap_energy,
    farthest_point_sampling,
    pose_features,
)
from avatar.skinning.lbs import (
    blend_transforms,
    dqs_points,
    inverse_lbs_points,
    lbs_points,
    polar_rotation,
    skin_covariances,
    skin_gaussians,
)
from avatar.skinning.weights import ResidualWeightField, residual_skin_weights, sinusoidal_encoding

__all__ = [
    "ControlPointConfig",
    "ControlPointDeformer",
    "PerGaussianConfig",
    "PerGaussianDeformer",
    "arap_energy",
    "farthest_point_sampling",
    "pose_features",
    "blend_transforms",
    "dqs_points",
    "inverse_lbs_points",
    "lbs_points",
    "polar_rotation",
    "skin_covariances",
    "skin_gaussians",
    "ResidualWeightField",
    "residual_skin_weights",
    "sinusoidal_encoding",
]
