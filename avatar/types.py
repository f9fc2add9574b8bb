"""Typed containers shared by every stage (frozen dataclasses; return new ones instead of patching).

Shapes use ``...`` for any batch dimensions; conventions are those of ``avatar.geometry`` and ARCHITECTURE.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class BodyPose:
    """A pose of a body model.

    rotations:   [..., J, 3] axis-angle per bone, in the model's local convention (for both anny and SMPL: the
                 rotation of the bone about its head, in world-aligned axes of the rest pose). ``rotations[..., 0, :]``
                 is the root's rotation, about the root's head.
    translation: [..., 3] metres, added after the root rotation. A zero pose (all zeros) gives the rest pose exactly.
    """

    rotations: Tensor
    translation: Tensor

    def __post_init__(self) -> None:
        _check(
            self.rotations.ndim >= 2 and self.rotations.shape[-1] == 3,
            f"BodyPose.rotations must be [..., J, 3], got {tuple(self.rotations.shape)}",
        )
        _check(
            self.translation.shape[-1:] == (3,),
            f"BodyPose.translation must be [..., 3], got {tuple(self.translation.shape)}",
        )
        _check(
            self.rotations.shape[:-2] == self.translation.shape[:-1],
            f"BodyPose batch shapes differ: rotations {tuple(self.rotations.shape)}, "
            f"translation {tuple(self.translation.shape)}",
        )

    @staticmethod
    def zeros(num_bones: int, batch: tuple[int, ...] = (), dtype=torch.float32, device=None) -> "BodyPose":
        return BodyPose(
            torch.zeros(*batch, num_bones, 3, dtype=dtype, device=device),
            torch.zeros(*batch, 3, dtype=dtype, device=device),
        )

    @property
    def batch_shape(self) -> torch.Size:
        return self.rotations.shape[:-2]


@dataclass(frozen=True)
class Cameras:
    """Calibrated pinhole cameras (OpenCV convention, distortion already removed).

    viewmats: [..., 4, 4] world-to-camera.
    Ks:       [..., 3, 3] pixel intrinsics.
    width, height: image size in pixels.
    """

    viewmats: Tensor
    Ks: Tensor
    width: int
    height: int

    def __post_init__(self) -> None:
        _check(self.viewmats.shape[-2:] == (4, 4), f"Cameras.viewmats must be [..., 4, 4], got {tuple(self.viewmats.shape)}")
        _check(self.Ks.shape[-2:] == (3, 3), f"Cameras.Ks must be [..., 3, 3], got {tuple(self.Ks.shape)}")
        _check(
            self.viewmats.shape[:-2] == self.Ks.shape[:-2],
            f"Cameras batch shapes differ: viewmats {tuple(self.viewmats.shape)}, Ks {tuple(self.Ks.shape)}",
        )
        _check(self.width > 0 and self.height > 0, f"Cameras size must be positive, got {self.width}x{self.height}")


@dataclass(frozen=True)
class RestBody:
    """A body model's canonical (rest-pose) state for a shape.

    vertices:   [B, V, 3] rest-pose vertices.
    bone_heads: [B, J, 3] rest-pose bone heads (joints).
    bone_poses: [B, J, 4, 4] rest-pose bone frames (bone-to-world).
    """

    vertices: Tensor
    bone_heads: Tensor
    bone_poses: Tensor


@dataclass(frozen=True)
class BodyOutput:
    """A posed body.

    vertices:        [B, V, 3] posed vertices.
    bone_transforms: [B, J, 4, 4] canonical -> posed transform of each bone (what LBS blends).
    joints:          [B, J, 3] posed bone heads.
    rest:            the canonical state the pose was applied to.
    pose_offsets:    [B, V, 3] pose-dependent corrective offsets added in canonical space before skinning
                     (SMPL's pose blend shapes; zeros for anny).
    """

    vertices: Tensor
    bone_transforms: Tensor
    joints: Tensor
    rest: RestBody
    pose_offsets: Tensor


@dataclass(frozen=True)
class GaussianSet:
    """3D Gaussians (canonical or posed).

    means:        [N, 3] metres.
    quats:        [N, 4] rotations, wxyz (need not be normalized).
    scales:       [N, 3] standard deviations along the rotated axes, metres (linear, not log).
    opacities:    [N] in (0, 1).
    colors:       [N, 3] RGB in [0, 1] (view-independent).
    skin_weights: [N, J] dense skinning weights (rows sum to 1), or None for posed sets.
    """

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    colors: Tensor
    skin_weights: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.means.shape[0] if self.means.ndim == 2 else -1
        _check(self.means.ndim == 2 and self.means.shape[1] == 3, f"GaussianSet.means must be [N, 3], got {tuple(self.means.shape)}")
        for name, t, shape in (("quats", self.quats, (n, 4)), ("scales", self.scales, (n, 3)),
                               ("opacities", self.opacities, (n,)), ("colors", self.colors, (n, 3))):
            _check(tuple(t.shape) == shape, f"GaussianSet.{name} must be {list(shape)}, got {tuple(t.shape)}")
        if self.skin_weights is not None:
            _check(self.skin_weights.ndim == 2 and self.skin_weights.shape[0] == n,
                   f"GaussianSet.skin_weights must be [N, J], got {tuple(self.skin_weights.shape)}")

    def __len__(self) -> int:
        return int(self.means.shape[0])
