"""Rotations, rigid transforms and projection: pure functions on tensors.

Conventions (written once, referred to everywhere; see ARCHITECTURE.md):
- rotations at interfaces are axis-angle vectors ``[..., 3]`` (radians) or matrices ``[..., 3, 3]`` acting on
  column vectors; quaternions are ``wxyz``.
- cameras follow OpenCV: x right, y down, z forward; ``viewmats [..., 4, 4]`` map world to camera, ``Ks [..., 3, 3]``
  are pixel intrinsics; lengths are metres.
"""

from avatar.geometry.rotations import (
    axis_angle_to_matrix,
    matrix_to_axis_angle,
    matrix_to_quat,
    quat_multiply,
    quat_to_matrix,
    rigid,
    rigid_inverse,
)
from avatar.geometry.projection import look_at, intrinsics_from_fov, project_points

__all__ = [
    "axis_angle_to_matrix",
    "matrix_to_axis_angle",
    "matrix_to_quat",
    "quat_multiply",
    "quat_to_matrix",
    "rigid",
    "rigid_inverse",
    "look_at",
    "intrinsics_from_fov",
    "project_points",
]
