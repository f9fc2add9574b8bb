"""What every dataset yields: one ``Frame`` per (frame, camera) pair, for fitting and for evaluation."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from avatar.types import BodyPose, Cameras


@dataclass(frozen=True)
class Frame:
    """One image of a subject.

    image:      [H, W, 3] float32 in [0, 1], undistorted.
    mask:       [H, W] float32 in [0, 1] (person = 1).
    camera:     ``Cameras`` with viewmats [4, 4], Ks [3, 3] (OpenCV, metres, distortion removed).
    pose:       ``BodyPose`` with rotations [J, 3], translation [3] in the world frame of the cameras.
    shape:      [S] body shape parameters of ``body_model``.
    body_model: "anny", "smpl" or "smplx" (which model ``pose`` and ``shape`` belong to).
    frame_id:   index of the frame in the sequence; camera_id: name or index of the camera.
    """

    image: Tensor
    mask: Tensor
    camera: Cameras
    pose: BodyPose
    shape: Tensor
    body_model: str
    frame_id: int
    camera_id: str
