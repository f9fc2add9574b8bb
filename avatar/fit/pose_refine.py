"""Per-frame body pose corrections, learned with the avatar (optional).

A table of axis-angle deltas ``[F, J, 3]`` and translation deltas ``[F, 3]``, zero at the start, added to each
frame's input pose (``rotations + delta``: the input is close to right, so the sum is a good first-order
correction and keeps the prior simple). ``prior`` is the mean squared delta (an L2 prior towards the input).
Frames are keyed by ``frame_id`` so every camera of a multi-view frame shares one correction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from avatar.types import BodyPose


def apply_pose_delta(pose: BodyPose, rot_delta: Tensor, trans_delta: Tensor) -> BodyPose:
    """``pose`` (rotations [..., J, 3], translation [..., 3]) plus deltas of the same shapes."""
    if rot_delta.shape != pose.rotations.shape or trans_delta.shape != pose.translation.shape:
        raise ValueError(f"apply_pose_delta: deltas {tuple(rot_delta.shape)}, {tuple(trans_delta.shape)} must match "
                         f"pose {tuple(pose.rotations.shape)}, {tuple(pose.translation.shape)}")
    return BodyPose(pose.rotations + rot_delta.to(pose.rotations), pose.translation + trans_delta.to(pose.translation))


def pose_prior(rot_delta: Tensor, trans_delta: Tensor, translation_weight: float = 1.0) -> Tensor:
    """Mean squared rotation delta (radians², over bones) plus ``translation_weight`` x mean squared translation delta
    (m²). rot_delta: [..., J, 3]; trans_delta: [..., 3]."""
    if rot_delta.shape[-1] != 3 or trans_delta.shape[-1] != 3:
        raise ValueError(f"pose_prior: deltas must be [..., J, 3] and [..., 3], got {tuple(rot_delta.shape)}, "
                         f"{tuple(trans_delta.shape)}")
    return rot_delta.square().sum(-1).mean() + translation_weight * trans_delta.square().sum(-1).mean()


class PoseRefiner(nn.Module):
    """Per-frame deltas. frame_ids: the training frames' ids (F distinct); num_bones: J.

    rot_deltas [F, J, 3] and trans_deltas [F, 3]: parameters (zeros). frame_ids [F]: int64 buffer."""

    def __init__(self, frame_ids: Sequence[int], num_bones: int) -> None:
        super().__init__()
        ids = sorted({int(f) for f in frame_ids})
        if not ids or num_bones < 1:
            raise ValueError(f"PoseRefiner: needs at least one frame id and bone, got {len(ids)} frames, {num_bones} bones")
        self.register_buffer("frame_ids", torch.tensor(ids, dtype=torch.int64))
        self._row = {f: i for i, f in enumerate(ids)}
        self.rot_deltas = nn.Parameter(torch.zeros(len(ids), num_bones, 3))
        self.trans_deltas = nn.Parameter(torch.zeros(len(ids), 3))

    def row(self, frame_id: int) -> int:
        try:
            return self._row[int(frame_id)]
        except KeyError:
            raise KeyError(f"PoseRefiner: frame {frame_id} was not among the training frames") from None

    def forward(self, pose: BodyPose, frame_id: int) -> BodyPose:
        """The corrected pose of frame ``frame_id`` (``pose``: rotations [J, 3], translation [3])."""
        r = self.row(frame_id)
        return apply_pose_delta(pose, self.rot_deltas[r], self.trans_deltas[r])

    def prior(self, frame_id: int | None = None) -> Tensor:
        """The L2 prior of one frame's deltas, or of all frames'."""
        if frame_id is None:
            return pose_prior(self.rot_deltas, self.trans_deltas)
        r = self.row(frame_id)
        return pose_prior(self.rot_deltas[r], self.trans_deltas[r])

    def param_groups(self, lr: float) -> list[dict]:
        return [dict(name="pose_refine", params=[self.rot_deltas, self.trans_deltas], lr=lr)]
