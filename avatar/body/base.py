"""The one interface every body model implements (anny, SMPL, SMPL-X).

A body model owns its mesh (faces, UVs), its skeleton (bone names, parents), its skinning weights and the map from
(shape, pose) to rest-pose geometry and bone transforms. Skinning itself is ``avatar.skinning.lbs_points``, so a
model's posed vertices are exactly what downstream code gets by skinning the same canonical points.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor, nn

from avatar.skinning.lbs import lbs_points
from avatar.types import BodyOutput, BodyPose, RestBody


class BodyModel(nn.Module, abc.ABC):
    """Base class. Subclasses set the attributes below and register these buffers:

    faces:        [F, 3] int64 triangle vertex indices (counter-clockwise seen from outside).
    skin_indices: [V, K] int64 bone ids per vertex.
    skin_weights: [V, K] float weights per vertex (rows sum to 1).
    uvs:          [T, 2] float texture coordinates, or None.
    face_uvs:     [F, 3] int64 indices into ``uvs``, or None.
    keypoint_regressor: [17, V] COCO-17 keypoint regressor, or None.
    """

    name: str
    up_axis: str  # "z" for anny, "y" for SMPL/SMPL-X: the world axis the standing body points along
    bone_names: tuple[str, ...]
    bone_parents: tuple[int, ...]  # parent bone index, -1 for the root (index 0)
    shape_names: tuple[str, ...]
    keypoint_names: tuple[str, ...] = ()

    faces: Tensor
    skin_indices: Tensor
    skin_weights: Tensor
    uvs: Tensor | None
    face_uvs: Tensor | None
    keypoint_regressor: Tensor | None

    @property
    def num_bones(self) -> int:
        return len(self.bone_names)

    @property
    def num_vertices(self) -> int:
        return int(self.skin_indices.shape[0])

    @property
    def shape_dim(self) -> int:
        return len(self.shape_names)

    @property
    def dtype(self) -> torch.dtype:
        return self.skin_weights.dtype

    @property
    def device(self) -> torch.device:
        return self.skin_weights.device

    # --- to implement -------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def default_shape(self) -> Tensor:
        """The model's mean shape ``[S]``."""

    @abc.abstractmethod
    def _rest(self, shape: Tensor) -> RestBody:
        """Rest state for validated ``shape [B, S]``."""

    @abc.abstractmethod
    def _bone_transforms(self, pose: BodyPose, rest: RestBody) -> tuple[Tensor, Tensor]:
        """``(transforms [B, J, 4, 4], posed joints [B, J, 3])`` for validated ``pose`` with batch ``[B]``."""

    def _pose_offsets(self, pose: BodyPose, rest: RestBody) -> Tensor:
        """Pose-dependent corrective offsets ``[B, V, 3]`` in canonical space (none by default)."""
        return torch.zeros_like(rest.vertices)

    # --- public API ---------------------------------------------------------------------------------------------

    def _batched_shape(self, shape: Tensor | None, batch: int) -> Tensor:
        if shape is None:
            shape = self.default_shape()
        if not isinstance(shape, Tensor):
            raise TypeError(f"{self.name}: shape must be a tensor [B, {self.shape_dim}] or [{self.shape_dim}], got {type(shape).__name__}")
        if shape.ndim == 1:
            shape = shape.unsqueeze(0)
        if shape.ndim != 2 or shape.shape[-1] != self.shape_dim:
            raise ValueError(f"{self.name}: shape must be [B, {self.shape_dim}] ({', '.join(self.shape_names)}), got {tuple(shape.shape)}")
        if shape.shape[0] not in (1, batch):
            raise ValueError(f"{self.name}: shape batch {shape.shape[0]} does not match pose batch {batch}")
        return shape.to(self.dtype).expand(batch, -1)

    def _batched_pose(self, pose: BodyPose) -> BodyPose:
        if not isinstance(pose, BodyPose):
            raise TypeError(f"{self.name}: pose must be a BodyPose, got {type(pose).__name__}")
        if pose.rotations.shape[-2] != self.num_bones:
            raise ValueError(f"{self.name}: pose has {pose.rotations.shape[-2]} bones, the model has {self.num_bones}")
        if pose.rotations.ndim == 2:
            pose = BodyPose(pose.rotations.unsqueeze(0), pose.translation.unsqueeze(0))
        if pose.rotations.ndim != 3:
            raise ValueError(f"{self.name}: pose must have one batch dimension at most, got rotations {tuple(pose.rotations.shape)}")
        return BodyPose(pose.rotations.to(self.dtype), pose.translation.to(self.dtype))

    def rest(self, shape: Tensor | None = None) -> RestBody:
        """Canonical (rest-pose) vertices, bone heads and bone frames for ``shape [B, S]`` (default: mean shape)."""
        return self._rest(self._batched_shape(shape, 1 if shape is None or shape.ndim == 1 else shape.shape[0]))

    def bone_transforms(self, pose: BodyPose, shape: Tensor | None = None) -> tuple[Tensor, RestBody]:
        """Canonical -> posed bone transforms ``[B, J, 4, 4]`` for ``pose`` and ``shape``, with the rest state."""
        pose = self._batched_pose(pose)
        rest = self._rest(self._batched_shape(shape, pose.rotations.shape[0]))
        transforms, _ = self._bone_transforms(pose, rest)
        return transforms, rest

    def forward(self, pose: BodyPose, shape: Tensor | None = None) -> BodyOutput:
        """Posed body for ``pose`` (batch ``[B]`` or none) and ``shape [B, S]``, ``[S]`` or None (mean shape)."""
        pose = self._batched_pose(pose)
        rest = self._rest(self._batched_shape(shape, pose.rotations.shape[0]))
        transforms, joints = self._bone_transforms(pose, rest)
        offsets = self._pose_offsets(pose, rest)
        vertices = lbs_points(rest.vertices + offsets, self.skin_weights, transforms, self.skin_indices)
        return BodyOutput(vertices=vertices, bone_transforms=transforms, joints=joints, rest=rest, pose_offsets=offsets)

    def dense_skin_weights(self) -> Tensor:
        """Skinning weights as a dense ``[V, J]`` matrix."""
        dense = torch.zeros(self.num_vertices, self.num_bones, dtype=self.skin_weights.dtype, device=self.device)
        return dense.scatter_add_(1, self.skin_indices, self.skin_weights)

    def keypoints(self, vertices: Tensor) -> Tensor:
        """COCO-17 keypoints ``[..., 17, 3]`` regressed from (posed) ``vertices [..., V, 3]``."""
        if self.keypoint_regressor is None:
            raise ValueError(f"{self.name}: this body model has no COCO-17 keypoint regressor")
        if vertices.shape[-2:] != (self.num_vertices, 3):
            raise ValueError(f"{self.name}: vertices must be [..., {self.num_vertices}, 3], got {tuple(vertices.shape)}")
        return self.keypoint_regressor.to(vertices.dtype) @ vertices

    def bone_index(self, name: str) -> int:
        try:
            return self.bone_names.index(name)
        except ValueError:
            raise KeyError(f"{self.name}: no bone named {name!r}; bones are {', '.join(self.bone_names)}") from None
