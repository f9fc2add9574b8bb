"""SMPL / SMPL-X through the ``smplx`` package, from a model folder or file the user supplies (licensed, not bundled).

Shapes are the model's betas; the pose is axis-angle per joint (joint 0 = global orientation, about the pelvis
joint) plus a translation, exactly smplx's ``global_orient`` / ``body_pose`` (/ jaw, eyes, hands for SMPL-X) and
``transl``. SMPL's pose blend shapes are returned as ``pose_offsets`` and added in canonical space before skinning,
so ``lbs_points(rest + pose_offsets, ...)`` equals smplx's own output.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from avatar.body.base import BodyModel
from avatar.geometry.rotations import axis_angle_to_matrix, rigid
from avatar.types import BodyPose, RestBody

SMPL_DOWNLOAD_HELP = (
    "SMPL and SMPL-X model files are licensed and not bundled with this project. Register and download them from "
    "https://smpl.is.tue.mpg.de (SMPL) or https://smpl-x.is.tue.mpg.de (SMPL-X), then pass the folder that holds "
    "smpl/SMPL_NEUTRAL.pkl (or smplx/SMPLX_NEUTRAL.npz), or the model file itself. The default body model, anny, "
    "needs no download."
)

_SMPL_BONES = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2", "left_ankle", "right_ankle",
    "spine3", "left_foot", "right_foot", "neck", "left_collar", "right_collar", "head", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hand", "right_hand",
)


def _resolve_model_file(model_path: Path, model_type: str, gender: str) -> Path:
    if not model_path.exists():
        raise FileNotFoundError(f"{model_path}: no such file or folder for the {model_type.upper()} model.\n{SMPL_DOWNLOAD_HELP}")
    if model_path.is_file():
        return model_path
    stem = {"smpl": "SMPL", "smplx": "SMPLX"}[model_type]
    for folder in (model_path / model_type, model_path):
        for ext in ("pkl", "npz") if model_type == "smpl" else ("npz", "pkl"):
            candidate = folder / f"{stem}_{gender.upper()}.{ext}"
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"{model_path}: no {stem}_{gender.upper()}.pkl/.npz in this folder or in its '{model_type}' subfolder.\n{SMPL_DOWNLOAD_HELP}"
    )


class SMPLBody(BodyModel):
    up_axis = "y"

    def __init__(self, model_path: str | Path, model_type: str = "smpl", gender: str = "neutral", num_betas: int = 10) -> None:
        super().__init__()
        if model_type not in ("smpl", "smplx"):
            raise ValueError(f"model_type must be 'smpl' or 'smplx', got {model_type!r}")
        if gender not in ("neutral", "male", "female"):
            raise ValueError(f"gender must be 'neutral', 'male' or 'female', got {gender!r}")
        import smplx

        model_file = _resolve_model_file(Path(model_path), model_type, gender)
        ext = model_file.suffix.lstrip(".")
        try:
            if model_type == "smpl":
                self._smpl = smplx.SMPL(str(model_file), gender=gender, num_betas=num_betas)
            else:
                self._smpl = smplx.SMPLX(str(model_file), gender=gender, num_betas=num_betas, ext=ext, use_pca=False)
        except ModuleNotFoundError as err:  # official .pkl files pickle chumpy arrays
            raise ValueError(
                f"{model_file}: loading it needs the module {err.name!r}; official SMPL .pkl files store chumpy arrays. "
                "Convert the file to plain numpy arrays (an .npz for SMPL-X) or install that module."
            ) from err
        except (KeyError, AttributeError, ValueError) as err:
            raise ValueError(f"{model_file}: not a valid {model_type.upper()} model file ({type(err).__name__}: {err})") from err
        self._smpl.requires_grad_(False)
        self.name = model_type
        parents = self._smpl.parents.tolist()
        parents[0] = -1
        self.bone_parents = tuple(int(p) for p in parents)
        num_joints = len(parents)
        self.bone_names = _SMPL_BONES if num_joints == 24 else tuple(f"joint{i:02d}" for i in range(num_joints))
        self.shape_names = tuple(f"beta{i}" for i in range(self._smpl.num_betas))
        weights = self._smpl.lbs_weights.to(torch.float32)
        self.register_buffer("faces", self._smpl.faces_tensor.to(torch.int64), persistent=False)
        self.register_buffer("skin_indices", torch.arange(num_joints).expand(weights.shape[0], -1).contiguous(), persistent=False)
        self.register_buffer("skin_weights", weights, persistent=False)
        self.register_buffer("uvs", None, persistent=False)
        self.register_buffer("face_uvs", None, persistent=False)
        self.register_buffer("keypoint_regressor", None, persistent=False)

    def default_shape(self) -> Tensor:
        return torch.zeros(self.shape_dim, dtype=self.dtype, device=self.device)

    def _rest(self, shape: Tensor) -> RestBody:
        from smplx.lbs import blend_shapes, vertices2joints

        m = self._smpl
        vertices = m.v_template.to(shape.dtype) + blend_shapes(shape, m.shapedirs.to(shape.dtype))
        joints = vertices2joints(m.J_regressor.to(shape.dtype), vertices)
        eye = torch.eye(3, dtype=shape.dtype, device=shape.device).expand(*joints.shape[:-1], 3, 3)
        return RestBody(vertices=vertices, bone_heads=joints, bone_poses=rigid(eye, joints))

    def _bone_transforms(self, pose: BodyPose, rest: RestBody) -> tuple[Tensor, Tensor]:
        from smplx.lbs import batch_rigid_transform

        R = axis_angle_to_matrix(pose.rotations)
        joints, transforms = batch_rigid_transform(R, rest.bone_heads, self._smpl.parents, dtype=R.dtype)
        transl = pose.translation.unsqueeze(-2)
        transforms = torch.cat(
            [transforms[..., :3, :3], (transforms[..., :3, 3] + transl).unsqueeze(-1)], dim=-1
        )
        bottom = torch.zeros_like(transforms[..., :1, :])
        bottom[..., 0, 3] = 1.0
        return torch.cat([transforms, bottom], dim=-2), joints + transl

    def _pose_offsets(self, pose: BodyPose, rest: RestBody) -> Tensor:
        R = axis_angle_to_matrix(pose.rotations[:, 1:])
        eye = torch.eye(3, dtype=R.dtype, device=R.device)
        feature = (R - eye).flatten(1)  # [B, (J-1)*9]
        return (feature @ self._smpl.posedirs.to(R.dtype)).view(rest.vertices.shape)

    def smplx_forward_vertices(self, pose: BodyPose, shape: Tensor | None = None) -> Tensor:
        """smplx's own forward pass for ``pose`` (the reference our skinning is tested against), ``[B, V, 3]``."""
        pose = self._batched_pose(pose)
        B = pose.rotations.shape[0]
        betas = self._batched_shape(shape, B)
        rot = pose.rotations
        if self.name == "smpl":
            out = self._smpl(betas=betas, global_orient=rot[:, 0], body_pose=rot[:, 1:].flatten(1), transl=pose.translation)
        else:
            out = self._smpl(
                betas=betas, global_orient=rot[:, 0], body_pose=rot[:, 1:22].flatten(1), jaw_pose=rot[:, 22],
                leye_pose=rot[:, 23], reye_pose=rot[:, 24], left_hand_pose=rot[:, 25:40].flatten(1),
                right_hand_pose=rot[:, 40:55].flatten(1), transl=pose.translation,
                expression=betas.new_zeros(B, self._smpl.num_expression_coeffs),
            )
        return out.vertices
