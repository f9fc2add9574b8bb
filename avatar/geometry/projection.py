"""Pinhole cameras in the OpenCV convention (x right, y down, z forward, metres, pixels)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def look_at(eye: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """World-to-camera ``viewmats [..., 4, 4]`` for cameras at ``eye [..., 3]`` looking at ``target [..., 3]``.

    ``up [..., 3]`` is the world direction that appears upwards in the image (the camera's -y axis).
    """
    z = target - eye
    z = z / z.norm(dim=-1, keepdim=True)
    x = torch.linalg.cross(z, up.expand_as(z))
    x_norm = x.norm(dim=-1, keepdim=True)
    if bool((x_norm < 1e-8).any()):
        raise ValueError("look_at: the viewing direction is parallel to `up`; pick another up vector.")
    x = x / x_norm
    y = torch.linalg.cross(z, x)
    R = torch.stack([x, y, z], dim=-2)  # rows: camera axes in world coordinates
    t = -(R @ eye.unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(*R.shape[:-2], 4, 4, dtype=eye.dtype, device=eye.device)
    out[..., :3, :3] = R
    out[..., :3, 3] = t
    out[..., 3, 3] = 1.0
    return out


def intrinsics_from_fov(fov_y_degrees: float, width: int, height: int, dtype=torch.float32) -> Tensor:
    """Pixel intrinsics ``[3, 3]`` for a vertical field of view, principal point at the image centre."""
    if not 0.0 < fov_y_degrees < 180.0:
        raise ValueError(f"fov_y_degrees must be in (0, 180), got {fov_y_degrees}")
    f = 0.5 * height / math.tan(math.radians(fov_y_degrees) / 2)
    return torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], dtype=dtype)


def project_points(points: Tensor, viewmats: Tensor, Ks: Tensor) -> tuple[Tensor, Tensor]:
    """Project world points ``[..., N, 3]`` with ``viewmats [..., 4, 4]`` and ``Ks [..., 3, 3]``.

    Returns pixel coordinates ``[..., N, 2]`` (pixel centres at +0.5) and camera depths ``[..., N]``.
    """
    cam = points @ viewmats[..., :3, :3].transpose(-1, -2) + viewmats[..., None, :3, 3]
    depth = cam[..., 2]
    uv = cam @ Ks.transpose(-1, -2)
    return uv[..., :2] / uv[..., 2:3], depth
