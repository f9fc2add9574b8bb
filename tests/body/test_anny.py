import pytest
import torch

from avatar.body import AnnyBody, load_body_model
from avatar.geometry import axis_angle_to_matrix
from avatar.skinning import lbs_points
from avatar.types import BodyPose


def random_pose(body, batch, gen, scale=0.4):
    return BodyPose(
        scale * torch.randn(batch, body.num_bones, 3, generator=gen),
        torch.randn(batch, 3, generator=gen),
    )


def test_structure(anny_body):
    b = anny_body
    assert b.num_vertices == 13718 and b.faces.shape == (27420, 3) and b.num_bones == 104
    assert b.bone_parents[0] == -1 and all(0 <= p < i for i, p in enumerate(b.bone_parents) if i > 0)
    assert b.shape_names == ("gender", "age", "muscle", "weight", "height", "proportions")
    assert b.uvs.shape[1] == 2 and b.face_uvs.shape == b.faces.shape and int(b.face_uvs.max()) < b.uvs.shape[0]
    assert b.keypoint_names[:5] == ("nose", "left_eye", "right_eye", "left_ear", "right_ear")
    assert b.keypoint_names[15:17] == ("left_ankle", "right_ankle")
    assert b.dtype == torch.float32 and b.up_axis == "z"
    dense = b.dense_skin_weights()
    torch.testing.assert_close(dense.sum(1), torch.ones(b.num_vertices), atol=1e-5, rtol=0)


def test_lbs_reproduces_anny_forward(anny_body, gen):
    """Our LBS over anny's weights and bone transforms equals anny's own forward pass."""
    for _ in range(3):
        pose = random_pose(anny_body, 4, gen)
        shape = torch.rand(4, anny_body.shape_dim, generator=gen)
        ours = anny_body(pose, shape)
        ref = anny_body.anny_forward_vertices(pose, shape)
        assert ours.vertices.shape == ref.shape == (4, 13718, 3)
        assert (ours.vertices - ref).abs().max().item() <= 1e-5
        # and the same again straight from the pure function with the returned transforms
        again = lbs_points(ours.rest.vertices, anny_body.skin_weights, ours.bone_transforms, anny_body.skin_indices)
        assert (again - ref).abs().max().item() <= 1e-5


def test_zero_pose_is_rest_pose(anny_body):
    out = anny_body(BodyPose.zeros(anny_body.num_bones))
    torch.testing.assert_close(out.vertices, out.rest.vertices, atol=2e-6, rtol=0)
    eye = torch.eye(4).expand_as(out.bone_transforms)
    torch.testing.assert_close(out.bone_transforms, eye, atol=5e-6, rtol=0)
    torch.testing.assert_close(out.joints, out.rest.bone_heads, atol=2e-6, rtol=0)


def test_bone_rotation_acts_in_world_axes_about_head(anny_body):
    """Rotating one bone by R turns its child's head about its own head by exactly R (world axes)."""
    b = anny_body
    arm = b.bone_index("upperarm01.L")
    child = b.bone_parents.index(arm)
    rot = torch.zeros(1, b.num_bones, 3)
    rot[0, arm] = torch.tensor([0.3, -0.5, 0.7])
    out = b(BodyPose(rot, torch.zeros(1, 3)))
    h = out.rest.bone_heads[0]
    expected = h[arm] + axis_angle_to_matrix(rot[0, arm]) @ (h[child] - h[arm])
    torch.testing.assert_close(out.joints[0, child], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.joints[0, arm], h[arm], atol=1e-5, rtol=0)


def test_root_rotation_and_translation(anny_body):
    b = anny_body
    rot = torch.zeros(1, b.num_bones, 3)
    rot[0, 0] = torch.tensor([0.0, 0.0, 1.2])
    t = torch.tensor([[0.5, -1.0, 2.0]])
    out = b(BodyPose(rot, t))
    R = axis_angle_to_matrix(rot[0, 0])
    h0 = out.rest.bone_heads[0, 0]
    expected = (out.rest.vertices[0] - h0) @ R.T + h0 + t[0]
    torch.testing.assert_close(out.vertices[0], expected, atol=2e-5, rtol=0)


def test_shapes_change_the_body(anny_body):
    tall = anny_body.rest(torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 0.5]))
    short = anny_body.rest(torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 0.5]))
    height = lambda v: (v[0, :, 2].max() - v[0, :, 2].min()).item()  # noqa: E731
    assert height(tall.vertices) > height(short.vertices) + 0.1
    assert 1.4 < height(anny_body.rest().vertices) < 2.0


def test_keypoints(anny_body):
    out = anny_body(BodyPose.zeros(anny_body.num_bones))
    kp = anny_body.keypoints(out.vertices)
    assert kp.shape == (1, len(anny_body.keypoint_names), 3)
    names = anny_body.keypoint_names
    z = {n: kp[0, names.index(n), 2].item() for n in ("nose", "left_shoulder", "left_hip", "left_knee", "left_ankle")}
    assert z["nose"] > z["left_shoulder"] > z["left_hip"] > z["left_knee"] > z["left_ankle"]
    assert kp[0, names.index("left_shoulder"), 0] * kp[0, names.index("right_shoulder"), 0] < 0  # opposite sides


def test_float64_gradients_reach_pose_and_shape(anny_body):
    b64 = AnnyBody().to(torch.float64)
    rot = (0.2 * torch.randn(1, b64.num_bones, 3, dtype=torch.float64)).requires_grad_()
    shape = torch.full((1, 6), 0.4, dtype=torch.float64, requires_grad=True)
    out = b64(BodyPose(rot, torch.zeros(1, 3, dtype=torch.float64)), shape)
    out.vertices.square().sum().backward()
    assert rot.grad.abs().sum() > 0 and shape.grad.abs().sum() > 0
    assert out.vertices.dtype == torch.float64


def test_bad_inputs(anny_body):
    b = anny_body
    with pytest.raises(ValueError, match="104"):
        b(BodyPose.zeros(24))
    with pytest.raises(ValueError, match="shape must be"):
        b(BodyPose.zeros(104), torch.zeros(3))
    with pytest.raises(ValueError, match="batch"):
        b(BodyPose.zeros(104, batch=(2,)), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="BodyPose"):
        BodyPose(torch.zeros(104, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="keypoint|vertices"):
        b.keypoints(torch.zeros(10, 3))
    with pytest.raises(KeyError, match="no bone named"):
        b.bone_index("tail")
    with pytest.raises(ValueError, match="unknown body model"):
        load_body_model("mano")


def test_incomplete_export_is_refused(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        AnnyBody(export_dir=tmp_path)
