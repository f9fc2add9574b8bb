"""Per-frame body parameters on disk: which body model they belong to, and the EasyMocap convention.

Real ZJU-MoCap stores SMPL parameters per frame in the EasyMocap convention: ``poses (1, 72)`` with a zero global
part, ``Rh (1, 3)`` axis-angle, ``Th (1, 3)`` metres, ``shapes (1, 10)``, and the world vertices are
``SMPL(poses, shapes) @ R(Rh)^T + Th`` -- the global rotation turns about the world origin. Our ``BodyPose`` turns
the root about its rest head ``h0`` instead: ``R (x - h0) + h0 + t``. Equal for ``t = Th + R h0 - h0``.

Synthetic subjects store the parameters of *our* body model in the same files (``poses (1, 3 J)``, ``shapes (1, S)``)
plus a small metadata file, ``body_model.json``, saying which body model they belong to. A folder without it holds
SMPL parameters (the real datasets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from avatar.geometry.rotations import axis_angle_to_matrix
from avatar.types import BodyPose

METADATA_FILE = "body_model.json"
FORMAT = "avatar-body-params/1"


@dataclass(frozen=True)
class BodyModelInfo:
    """What ``body_model.json`` says: the model name (``anny``, ``smpl``, ``smplx``), its bone and shape counts."""

    name: str
    num_bones: int
    shape_dim: int

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "body_model": self.name, "num_bones": self.num_bones,
                           "shape_dim": self.shape_dim}, indent=2)


SMPL_INFO = BodyModelInfo("smpl", 24, 10)


def write_body_model_info(folder: Path, info: BodyModelInfo) -> None:
    """Write ``folder/body_model.json`` atomically."""
    from avatar.io import atomic_write_text

    atomic_write_text(Path(folder) / METADATA_FILE, info.to_json())


def read_body_model_info(folder: Path) -> BodyModelInfo:
    """Read ``folder/body_model.json``; a folder without it holds SMPL parameters (the real datasets)."""
    path = Path(folder) / METADATA_FILE
    if not path.exists():
        return SMPL_INFO
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        return BodyModelInfo(str(data["body_model"]), int(data["num_bones"]), int(data["shape_dim"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a valid body-model metadata file ({err})") from err


def pose_to_easymocap(pose: BodyPose, root_head: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``BodyPose`` (rotations ``[..., J, 3]``, translation ``[..., 3]``) and the rest root head ``[..., 3]`` ->
    EasyMocap ``(poses [..., 3 J] with a zero root part, Rh [..., 3], Th [..., 3])``."""
    Rh = pose.rotations[..., 0, :]
    R = axis_angle_to_matrix(Rh)
    Th = pose.translation - (R @ root_head.unsqueeze(-1)).squeeze(-1) + root_head
    poses = pose.rotations.clone()
    poses[..., 0, :] = 0.0
    return poses.flatten(-2), Rh, Th


def easymocap_to_pose(poses: Tensor, Rh: Tensor, Th: Tensor, root_head: Tensor) -> BodyPose:
    """EasyMocap ``poses [..., 3 J]`` (root part ignored), ``Rh [..., 3]``, ``Th [..., 3]`` and the rest root head
    ``[..., 3]`` of the shape -> our ``BodyPose``."""
    if poses.shape[-1] % 3:
        raise ValueError(f"poses must be [..., 3 J], got {tuple(poses.shape)}")
    rotations = poses.unflatten(-1, (-1, 3)).clone()
    rotations[..., 0, :] = Rh
    R = axis_angle_to_matrix(Rh)
    t = Th + (R @ root_head.unsqueeze(-1)).squeeze(-1) - root_head
    return BodyPose(rotations, t)
