import roma
import torch

from avatar.geometry import (
    axis_angle_to_matrix,
    intrinsics_from_fov,
    look_at,
    matrix_to_axis_angle,
    matrix_to_quat,
    project_points,
    quat_multiply,
    quat_to_matrix,
    rigid,
    rigid_inverse,
)


def test_quaternion_conventions(gen):
    q = torch.randn(100, 4, generator=gen, dtype=torch.float64)
    R = quat_to_matrix(q)
    qn = q / q.norm(dim=-1, keepdim=True)
    ref = roma.unitquat_to_rotmat(torch.cat([qn[:, 1:], qn[:, :1]], -1))  # roma is xyzw
    torch.testing.assert_close(R, ref)
    back = matrix_to_quat(R)
    torch.testing.assert_close(back, torch.where(qn[:, :1] < 0, -qn, qn))
    q2 = torch.randn(100, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(quat_to_matrix(quat_multiply(q, q2)), R @ quat_to_matrix(q2))


def test_axis_angle_roundtrip(gen):
    v = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    v = v / v.norm(dim=-1, keepdim=True) * torch.rand(50, 1, generator=gen, dtype=torch.float64) * 3.0
    torch.testing.assert_close(matrix_to_axis_angle(axis_angle_to_matrix(v)), v)


def test_rigid_inverse(gen):
    T = rigid(axis_angle_to_matrix(torch.randn(7, 3, generator=gen)), torch.randn(7, 3, generator=gen))
    torch.testing.assert_close(rigid_inverse(T) @ T, torch.eye(4).expand(7, 4, 4), atol=1e-6, rtol=0)


def test_look_at_and_projection():
    eye = torch.tensor([0.0, -3.0, 1.0])
    target = torch.tensor([0.0, 0.0, 1.0])
    V = look_at(eye, target, torch.tensor([0.0, 0.0, 1.0]))
    K = intrinsics_from_fov(40.0, 200, 100)
    uv, depth = project_points(torch.stack([target, target + torch.tensor([0.0, 0.0, 0.5])]), V, K)
    torch.testing.assert_close(uv[0], torch.tensor([100.0, 50.0]))
    torch.testing.assert_close(depth, torch.tensor([3.0, 3.0]))
    assert uv[1, 1] < 50.0  # world up projects upwards (image y down)
    torch.testing.assert_close(V[:3, :3] @ V[:3, :3].T, torch.eye(3), atol=1e-6, rtol=0)
