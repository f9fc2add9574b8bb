import json

import pytest
import torch

from avatar.data.params import (
    BodyModelInfo,
    easymocap_to_pose,
    pose_to_easymocap,
    read_body_model_info,
    write_body_model_info,
)
from avatar.types import BodyPose


def test_easymocap_roundtrip_and_world_equivalence(anny_body, gen):
    pose = BodyPose(0.3 * torch.randn(2, anny_body.num_bones, 3, generator=gen), torch.randn(2, 3, generator=gen))
    rest = anny_body.rest()
    h0 = rest.bone_heads[0, 0]
    poses, Rh, Th = pose_to_easymocap(pose, h0)
    assert poses.shape == (2, 3 * anny_body.num_bones) and (poses[:, :3] == 0).all()
    back = easymocap_to_pose(poses, Rh, Th, h0)
    torch.testing.assert_close(back.rotations, pose.rotations)
    torch.testing.assert_close(back.translation, pose.translation)
    # EasyMocap: world = model(poses with zero root) @ R(Rh)^T + Th
    from avatar.geometry import axis_angle_to_matrix

    local = anny_body(BodyPose(poses.unflatten(-1, (-1, 3)), torch.zeros(2, 3))).vertices
    world = local @ axis_angle_to_matrix(Rh).transpose(-1, -2) + Th[:, None]
    torch.testing.assert_close(world, anny_body(pose).vertices, atol=2e-5, rtol=0)


def test_metadata(tmp_path):
    assert read_body_model_info(tmp_path).name == "smpl"  # real datasets carry no metadata: SMPL
    write_body_model_info(tmp_path, BodyModelInfo("anny", 104, 6))
    assert read_body_model_info(tmp_path) == BodyModelInfo("anny", 104, 6)
    (tmp_path / "body_model.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="body_model.json"):
        read_body_model_info(tmp_path)
